"""vfio-pci below the core: config space, interrupts, regions, the sysfs view."""
