//! The candle device of a [`DeviceSpec`] (`cpu`, `cuda:N`).

use anyhow::{Context, Result};
use candle_core::Device;
use stackwise_common::config::DeviceSpec;

pub fn open(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => Device::new_cuda(ordinal)
            .with_context(|| format!("open {spec}; is this build made with --features cuda?")),
    }
}
