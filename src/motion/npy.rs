//! NumPy `.npy` arrays (HumanML3D's feature files, Mean/Std) through the `npyz` crate: read as f32
//! whatever the float width, written as little-endian f32 in C order.

use std::path::Path;

use anyhow::{bail, Context, Result};
use npyz::WriterBuilder;

/// A float array and its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
}

/// Read a C-order `.npy` of f4 or f8 numbers.
pub fn read(path: &Path) -> Result<Array> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let what = || format!("{} is not a float .npy array", path.display());
    let npy = npyz::NpyFile::new(&bytes[..]).with_context(what)?;
    if npy.order() != npyz::Order::C && npy.shape().len() > 1 {
        bail!("{}: Fortran-order arrays are not supported", path.display())
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let data = match npy.dtype() {
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float && t.size_field() == 4 => {
            npy.into_vec::<f32>().with_context(what)?
        }
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float && t.size_field() == 8 => {
            let v = npy.into_vec::<f64>().with_context(what)?;
            v.into_iter().map(|x| x as f32).collect()
        }
        other => bail!("{}: dtype {other:?}, expected f4 or f8", path.display()),
    };
    Ok(Array { data, shape })
}

/// Write `data` with `shape` as an f4 `.npy` (atomically).
pub fn write(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
    let bytes = to_bytes(data, shape).with_context(|| path.display().to_string())?;
    crate::files::write_atomic(path, &bytes)
}

/// `data` with `shape` as the bytes of an f4 `.npy` file.
pub fn to_bytes(data: &[f32], shape: &[usize]) -> Result<Vec<u8>> {
    if shape.iter().product::<usize>() != data.len() {
        bail!("{} numbers do not fill shape {shape:?}", data.len())
    }
    let mut bytes = Vec::new();
    let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&dims)
        .writer(&mut bytes)
        .begin_nd()?;
    w.extend(data.iter().copied())?;
    w.finish()?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_round_trip_and_bad_files_are_named() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lcm-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join("a.npy");
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        write(&p, &data, &[3, 4])?;
        assert_eq!(
            read(&p)?,
            Array {
                data: data.clone(),
                shape: vec![3, 4]
            }
        );
        assert!(write(&p, &data, &[5]).is_err());
        std::fs::write(dir.join("bad.npy"), b"not numpy")?;
        let e = read(&dir.join("bad.npy")).unwrap_err();
        assert!(format!("{e:#}").contains("bad.npy"), "{e:#}");
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
