//! The candle device of a [`DeviceSpec`] (`cpu`, `cuda:N`).

use anyhow::{Context, Result};
use candle_core::Device;
use stackwise_common::config::DeviceSpec;

pub fn open(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => {
            check_driver()?;
            Device::new_cuda(ordinal)
                .with_context(|| format!("open {spec}; is this build made with --features cuda?"))
        }
    }
}

/// cudarc opens the driver library on first use and panics when it is missing: say so first.
#[cfg(feature = "cuda")]
fn check_driver() -> Result<()> {
    // SAFETY: dlopen of the driver library by name, and dlclose; no symbol of it is called.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        return Ok(());
    }
    anyhow::bail!(
        "no CUDA driver: libcuda.so.1 is not on the loader's path (is this a GPU machine? \
         set LD_LIBRARY_PATH to the folder holding it)"
    )
}

#[cfg(not(feature = "cuda"))]
fn check_driver() -> Result<()> {
    Ok(())
}
