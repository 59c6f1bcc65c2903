//! Weight files: safetensors read as a `VarBuilder` for inference (memory-mapped, header checked
//! first) or as named tensors for training.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

/// Load safetensors weights as plain tensors (no autograd graph), converted to `dtype`.
pub fn load_weights(
    files: &[std::path::PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    for f in files {
        // Validate the header first: a clear error beats a panic inside mmap parsing.
        let mut fh =
            std::fs::File::open(f).with_context(|| format!("cannot open {}", f.display()))?;
        let mut len = [0u8; 8];
        std::io::Read::read_exact(&mut fh, &mut len)
            .with_context(|| format!("{} is not a safetensors file (too short)", f.display()))?;
        let size = fh.metadata()?.len();
        if u64::from_le_bytes(len) + 8 > size {
            bail!(
                "{} is not a safetensors file (bad header length)",
                f.display()
            )
        }
    }
    for f in files {
        check_finite(f)?;
    }
    // SAFETY: the files are opened read-only and not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
        .with_context(|| format!("cannot load weights {}", files[0].display()))?;
    Ok(vb)
}

/// Refuse a weight file with a NaN or infinite value, naming the tensor: such weights make black
/// images (or NaN motions) without any error. One pass over the mapped bytes, checking the
/// exponent bits of each float (f32, f16, bf16).
pub fn check_finite(file: &std::path::Path) -> Result<()> {
    use safetensors::Dtype;
    // SAFETY: read-only mapping of a file not modified meanwhile.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }
        .with_context(|| format!("cannot read {}", file.display()))?;
    for (name, view) in st.tensors() {
        let data = view.data();
        let bad = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .any(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7F80_0000 == 0x7F80_0000),
            Dtype::F16 => data
                .chunks_exact(2)
                .any(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7C00 == 0x7C00),
            Dtype::BF16 => data
                .chunks_exact(2)
                .any(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7F80 == 0x7F80),
            Dtype::F64 => data.chunks_exact(8).any(|b| {
                !f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]).is_finite()
            }),
            _ => false,
        };
        if bad {
            bail!(
                "{}: tensor {name} has NaN or infinite values",
                file.display()
            )
        }
    }
    Ok(())
}

/// Every tensor of some safetensors files, as stored.
pub fn tensors(files: &[std::path::PathBuf], device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for f in files {
        check_finite(f)?;
        all.extend(
            candle_core::safetensors::load(f, device)
                .with_context(|| format!("cannot read {}", f.display()))?,
        );
    }
    Ok(all)
}
