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
    // SAFETY: the files are opened read-only and not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
        .with_context(|| format!("cannot load weights {}", files[0].display()))?;
    Ok(vb)
}

/// Every tensor of some safetensors files, as stored.
pub fn tensors(files: &[std::path::PathBuf], device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for f in files {
        all.extend(
            candle_core::safetensors::load(f, device)
                .with_context(|| format!("cannot read {}", f.display()))?,
        );
    }
    Ok(all)
}
