//! Decoded tensors → 8-bit images → PNG files, written atomically (temp file + rename) so an
//! interrupted run never leaves a truncated output.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use image::RgbImage;

/// VAE output `[b, 3, H, W]` in ≈[−1, 1] → `[b, H, W, 3]` f32 in [0, 1] (diffusers' `np` output:
/// x/2 + 0.5, clamped).
pub fn to_unit_nhwc(decoded: &Tensor) -> Result<Tensor> {
    let x = decoded.to_dtype(DType::F32)?;
    Ok(((x / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?)
}

/// `[b, H, W, 3]` in [0, 1] → RGB images, rounding x·255 half-to-even in f32 as numpy does.
pub fn to_rgb8(unit_nhwc: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, h, w, c) = unit_nhwc.dims4()?;
    if c != 3 {
        bail!("expected 3 colour channels, got {c}")
    }
    let data = unit_nhwc.flatten_all()?.to_vec1::<f32>()?;
    let per = h * w * 3;
    (0..b)
        .map(|i| {
            let px: Vec<u8> = data[i * per..(i + 1) * per]
                .iter()
                .map(|v| (v * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
                .collect();
            RgbImage::from_raw(w as u32, h as u32, px).context("image buffer size")
        })
        .collect()
}

/// An image-to-image input as diffusers' `VaeImageProcessor` prepares it: at `width`×`height`
/// when given, else its own size rounded down to a multiple of `f`; resized (aspect not kept,
/// Lanczos-3 where diffusers uses PIL's Lanczos) only when the size differs; `[1, 3, H, W]` in
/// [−1, 1].
pub fn init_image_tensor(
    img: &RgbImage,
    width: Option<usize>,
    height: Option<usize>,
    f: usize,
) -> Result<Tensor> {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let w = width.unwrap_or(iw / f * f);
    let h = height.unwrap_or(ih / f * f);
    if w == 0 || h == 0 {
        bail!("the init image is {iw}x{ih}, smaller than the VAE's {f}-pixel cell")
    }
    let resized;
    let img = if (w, h) == (iw, ih) {
        img
    } else {
        resized = image::imageops::resize(
            img,
            w as u32,
            h as u32,
            image::imageops::FilterType::Lanczos3,
        );
        &resized
    };
    let data: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    Ok(
        Tensor::from_vec(data, (1, h, w, 3), &candle_core::Device::Cpu)?
            .permute((0, 3, 1, 2))?
            .affine(2.0, -1.0)?
            .contiguous()?,
    )
}

/// Decode image bytes (PNG, JPEG) to RGB, naming `what` (a file or a field) when they are not an
/// image.
pub fn decode_rgb(bytes: &[u8], what: &str) -> Result<RgbImage> {
    Ok(image::load_from_memory(bytes)
        .map_err(|e| anyhow::anyhow!("{what}: not a readable image ({e})"))?
        .to_rgb8())
}

pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)?;
    Ok(buf.into_inner())
}

pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    crate::files::write_atomic(path, &encode_png(img)?)
}

/// Equal-sized tiles laid out row by row, `cols` to a row.
pub fn grid(tiles: &[RgbImage], cols: usize) -> Result<RgbImage> {
    let Some(first) = tiles.first() else {
        anyhow::bail!("grid: no images")
    };
    let (w, h, cols) = (first.width(), first.height(), cols.max(1) as u32);
    let rows = (tiles.len() as u32).div_ceil(cols);
    let mut out = RgbImage::new(w * cols.min(tiles.len() as u32), h * rows);
    for (i, t) in tiles.iter().enumerate() {
        let i = i as u32;
        image::imageops::replace(
            &mut out,
            t,
            ((i % cols) * w).into(),
            ((i / cols) * h).into(),
        );
    }
    Ok(out)
}

/// Output names for `n` images: `out.png` for one, `out-0.png`, `out-1.png`, … for more.
pub fn numbered_paths(base: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![base.to_path_buf()];
    }
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let ext = base
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    (0..n)
        .map(|i| base.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_half_to_even() -> Result<()> {
        // 0.5/255 → 0.5 → 0 (even); 1.5/255 → 2.
        let t = Tensor::new(
            &[0.5f32 / 255.0, 1.5 / 255.0, 1.0],
            &candle_core::Device::Cpu,
        )?
        .reshape((1, 1, 1, 3))?;
        let img = &to_rgb8(&t)?[0];
        assert_eq!(img.as_raw(), &vec![0u8, 2, 255]);
        Ok(())
    }

    #[test]
    fn numbering() {
        let p = numbered_paths(Path::new("dir/cat.png"), 2);
        assert_eq!(
            p,
            vec![
                PathBuf::from("dir/cat-0.png"),
                PathBuf::from("dir/cat-1.png")
            ]
        );
        assert_eq!(
            numbered_paths(Path::new("a.png"), 1),
            vec![PathBuf::from("a.png")]
        );
    }
}
