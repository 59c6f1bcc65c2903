//! Device and precision selection shared by every command.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

#[derive(clap::Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// cpu, cuda or cuda:N (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight/compute precision of the text encoder and U-Net: auto, f32, f16 or bf16 (with f16
    /// the VAE stays f32). On the CPU, bf16 means bf16 weights for all three networks,
    /// multiplied on AMX tiles with f32 activations; it needs a CPU with AMX. auto: for
    /// `generate` and `serve`, bf16 on a CPU with AMX tiles and f32 elsewhere; other commands
    /// (training, eval, bench) read it as f32.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

impl RuntimeArgs {
    /// The device and precision for training, evaluation and benchmarks: `auto` is f32, so
    /// their figures do not depend on the CPU they ran on.
    pub fn resolve(&self) -> Result<(Device, DType)> {
        self.resolve_with(false)
    }

    /// The device and precision for generation and serving: `auto` is bf16 on a CPU with AMX
    /// tiles (within 1.1e-2 relative L2 of f32 per SD1.5-size U-Net evaluation, the shipped
    /// model's quality table within its seed-to-seed spread: docs/benchmarks.md), f32 elsewhere.
    pub fn resolve_for_inference(&self) -> Result<(Device, DType)> {
        self.resolve_with(true)
    }

    fn resolve_with(&self, inference: bool) -> Result<(Device, DType)> {
        let device = parse_device(&self.device)?;
        let dtype = match self.dtype.as_str() {
            "auto" if inference && device.is_cpu() && crate::kernels::amx::available() => {
                DType::BF16
            }
            "auto" => DType::F32,
            s => parse_dtype(s)?,
        };
        if device.is_cpu() && dtype == DType::BF16 && !crate::kernels::amx::available() {
            bail!(
                "--dtype bf16 on the CPU needs AMX tiles, not in use here (a CPU without them, \
                 or LCM_NO_AMX set; kernels: {}): use f32",
                crate::kernels::cpu::path(DType::F32)
            )
        }
        Ok((device, dtype))
    }
}

/// Thread settings for candle; call first thing in `main`, before any other thread exists.
pub fn init_threads() {
    // candle's CPU matmul asks for the thread count on every call and, without RAYON_NUM_THREADS,
    // counts physical cores by parsing /proc/cpuinfo each time: 15 % of a training step measured.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // candle's element-wise pool spin-waits at a barrier beside rayon's workers (gemm, our
    // kernels): on two cores the two pools' threads preempt each other. Measured with it on and
    // off (2-core Zen 4, 2026-12-06): tracked U-Net forward+backward 7.3 s vs 2.3 s (beside a
    // build), SD1.5 U-Net step 6.39 vs 6.18 s, SD1.5 VAE decode 15.2 vs 13.9 s, CLIP-L 283 vs
    // 247 ms, the shipped 64² U-Net 17.1 vs 13.7 ms (median of processes; the pool's runs also
    // scattered 1.4× between processes). So one pool, rayon's; an explicit setting is respected.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
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
        _ => bail!("--dtype {s:?}: expected auto, f32, f16 or bf16"),
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

/// Memory the OS says can be allocated without swapping (Linux `MemAvailable`), in bytes;
/// `None` where it cannot tell.
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}
