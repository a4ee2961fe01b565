"""The IOMMU drivers below the core: iommufd contexts and the type1 container."""
