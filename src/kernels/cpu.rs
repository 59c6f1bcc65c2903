//! Which instruction tier the CPU kernels run on, detected once at run time. The binary is built
//! for x86-64-v3 (AVX2 + FMA); AVX-512 paths are compiled beside it (gemm's `x86-v4` kernels,
//! `#[target_feature]` copies of the project's hot loops) and chosen here, so one binary serves
//! both kinds of machine.

use std::sync::OnceLock;

/// The CPU features that choose a kernel path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeatures {
    pub avx2_fma: bool,
    pub avx512f: bool,
    /// AMX bf16 tiles in the CPU (CPUID leaf 7: AMX-BF16 and AMX-TILE); the OS must grant them
    /// too ([`super::amx::available`]).
    pub amx_bf16: bool,
    /// AVX-512F with AVX512-BF16 (f32 → bf16 conversion instructions).
    pub avx512_bf16: bool,
}

/// This machine's features (detected on first use).
pub fn features() -> CpuFeatures {
    static F: OnceLock<CpuFeatures> = OnceLock::new();
    *F.get_or_init(detect)
}

/// Whether the AVX-512 paths run.
pub fn avx512() -> bool {
    features().avx512f
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CpuFeatures {
    // CPUID leaf 7 exists on every x86-64 CPU that runs an x86-64-v3 binary.
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    CpuFeatures {
        avx2_fma: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        avx512f: is_x86_feature_detected!("avx512f"),
        amx_bf16: leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0,
        avx512_bf16: is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> CpuFeatures {
    CpuFeatures {
        avx2_fma: false,
        avx512f: false,
        amx_bf16: false,
        avx512_bf16: false,
    }
}

/// The kernel path a network in `dtype` runs on this CPU, in words, for `lcm bench` and `lcm
/// generate` (e.g. "AVX-512 f32", "AMX bf16 tiles for linear layers, convolutions and attention, AVX-512 f32
/// elsewhere").
pub fn path(dtype: candle_core::DType) -> String {
    let f = features();
    let tier = if f.avx512f {
        "AVX-512 f32"
    } else if f.avx2_fma {
        "AVX2+FMA f32"
    } else {
        "portable f32"
    };
    match dtype {
        candle_core::DType::BF16 if super::amx::available() => {
            format!(
                "AMX bf16 tiles for linear layers, convolutions and attention, {tier} elsewhere"
            )
        }
        candle_core::DType::BF16 => {
            format!("portable bf16 products (no AMX tiles in use here), {tier} elsewhere")
        }
        candle_core::DType::F32 if super::amx::available() => {
            format!("{tier} (AMX bf16 tiles with --dtype bf16)")
        }
        candle_core::DType::F32 => tier.to_string(),
        other => format!("candle's {other:?} CPU ops"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_path_agrees_with_proc_cpuinfo() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            println!("no /proc/cpuinfo here: nothing to compare");
            return;
        };
        let flags: Vec<&str> = info
            .lines()
            .find_map(|l| l.strip_prefix("flags"))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        let f = super::features();
        assert_eq!(f.avx512f, flags.contains(&"avx512f"));
        assert_eq!(
            f.amx_bf16,
            flags.contains(&"amx_bf16") && flags.contains(&"amx_tile")
        );
        println!(
            "kernel paths on this CPU: f32 {}; bf16 {}",
            super::path(candle_core::DType::F32),
            super::path(candle_core::DType::BF16)
        );
    }
}
