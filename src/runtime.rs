//! Device and precision selection shared by every command.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

#[derive(clap::Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// cpu, cuda or cuda:N (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight/compute precision of the text encoder and U-Net: f32, f16 or bf16 (the VAE stays f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl RuntimeArgs {
    pub fn resolve(&self) -> Result<(Device, DType)> {
        let (device, dtype) = (parse_device(&self.device)?, parse_dtype(&self.dtype)?);
        if device.is_cpu() && dtype == DType::BF16 {
            bail!("--dtype bf16 is not supported on the CPU (candle has no bf16 matmul there): use f32 or f16")
        }
        Ok((device, dtype))
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| anyhow::anyhow!("--device {s:?}: bad GPU index"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this binary was built without CUDA (rebuild with --features cuda)")
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        _ => bail!("--device {s:?}: expected cpu, cuda or cuda:N"),
    }
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "fp32" => Ok(DType::F32),
        "f16" | "fp16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => bail!("--dtype {s:?}: expected f32, f16 or bf16"),
    }
}

/// Peak resident memory of this process so far (VmHWM), in bytes; 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
