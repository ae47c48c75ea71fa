"""What every layer may use and that imports nothing of toroidal: devices and dtypes, memory
estimates, timing, process launch, and how toroidal was installed (shipped configs, install hints)."""
