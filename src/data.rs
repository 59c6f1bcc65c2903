//! Image–caption datasets for training, in the Hugging Face imagefolder convention: a folder with
//! `metadata.jsonl` (`{"file_name": …, "text": …}` per line), or images with a same-name `.txt`
//! caption beside them. Images are resized (shorter side → resolution, bilinear) and centre-cropped
//! as diffusers' training scripts do. An unreadable image is skipped and reported, never fatal.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::imageops::FilterType;

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub image: PathBuf,
    pub caption: String,
}

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// List a dataset folder's examples in a stable (sorted) order.
pub fn scan(dir: &Path) -> Result<Vec<Example>> {
    if !dir.is_dir() {
        bail!("--data: {} is not a folder", dir.display())
    }
    let meta = dir.join("metadata.jsonl");
    let mut out = Vec::new();
    if meta.is_file() {
        let text = std::fs::read_to_string(&meta)
            .with_context(|| format!("cannot read {}", meta.display()))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not JSON", meta.display(), i + 1))?;
            let file = v["file_name"]
                .as_str()
                .with_context(|| format!("{} line {}: no file_name", meta.display(), i + 1))?;
            let caption = v["text"]
                .as_str()
                .with_context(|| format!("{} line {}: no text", meta.display(), i + 1))?;
            out.push(Example {
                image: dir.join(file),
                caption: caption.to_string(),
            });
        }
    } else {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .map(|e| {
                        IMAGE_EXTENSIONS
                            .contains(&e.to_string_lossy().to_ascii_lowercase().as_str())
                    })
                    .unwrap_or(false)
            })
            .collect();
        files.sort();
        for image in files {
            let txt = image.with_extension("txt");
            let caption = std::fs::read_to_string(&txt)
                .unwrap_or_default()
                .trim()
                .to_string();
            out.push(Example { image, caption });
        }
    }
    out.sort_by(|a, b| a.image.cmp(&b.image));
    if out.is_empty() {
        bail!(
            "--data: no images in {} (expected metadata.jsonl or images with .txt captions)",
            dir.display()
        )
    }
    Ok(out)
}

/// Read an image, resize its shorter side to `resolution`, centre-crop to a square and return a
/// `[3, resolution, resolution]` f32 tensor in [−1, 1].
pub fn load_image(path: &Path, resolution: usize, device: &Device) -> Result<Tensor> {
    let img = image::open(path)
        .with_context(|| format!("cannot decode {}", path.display()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        bail!("{} is empty", path.display())
    }
    let r = resolution as f64;
    let scale = r / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(resolution as u32),
        ((h as f64 * scale).round() as u32).max(resolution as u32),
    );
    let resized = image::imageops::resize(&img, nw, nh, FilterType::Triangle);
    let (x0, y0) = ((nw - resolution as u32) / 2, (nh - resolution as u32) / 2);
    let crop = image::imageops::crop_imm(&resized, x0, y0, resolution as u32, resolution as u32)
        .to_image();
    let data: Vec<f32> = crop
        .into_raw()
        .into_iter()
        .map(|v| v as f32 / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (resolution, resolution, 3), device)?
        .permute((2, 0, 1))?
        .contiguous()?)
}

/// What loading a dataset kept and what it skipped (with the reason).
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: usize,
    pub skipped: Vec<(PathBuf, String)>,
}

/// Load every example's image; unreadable ones are skipped with a warning and counted.
pub fn load_all(
    examples: &[Example],
    resolution: usize,
    device: &Device,
) -> (Vec<(Tensor, String)>, LoadReport) {
    let mut report = LoadReport::default();
    let mut out = Vec::new();
    for ex in examples {
        match load_image(&ex.image, resolution, device) {
            Ok(t) => {
                out.push((t, ex.caption.clone()));
                report.loaded += 1;
            }
            Err(e) => {
                eprintln!("warning: skipping {}: {e:#}", ex.image.display());
                report.skipped.push((ex.image.clone(), format!("{e:#}")));
            }
        }
    }
    (out, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
        image::RgbImage::from_pixel(w, h, image::Rgb(rgb))
            .save(path)
            .unwrap();
    }

    #[test]
    fn imagefolder_with_metadata_skips_a_corrupt_image() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lcm-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        write_png(&dir.join("a.png"), 40, 20, [255, 0, 0]);
        write_png(&dir.join("b.png"), 16, 16, [0, 0, 255]);
        std::fs::write(dir.join("c.png"), b"not a png")?;
        std::fs::write(
            dir.join("metadata.jsonl"),
            "{\"file_name\": \"a.png\", \"text\": \"red\"}\n{\"file_name\": \"b.png\", \"text\": \"blue\"}\n{\"file_name\": \"c.png\", \"text\": \"broken\"}\n",
        )?;
        let ex = scan(&dir)?;
        assert_eq!(
            ex.iter().map(|e| e.caption.as_str()).collect::<Vec<_>>(),
            ["red", "blue", "broken"]
        );
        let (items, report) = load_all(&ex, 8, &Device::Cpu);
        assert_eq!(report.loaded, 2);
        assert_eq!(report.skipped.len(), 1);
        assert!(report.skipped[0].0.ends_with("c.png"));
        assert_eq!(items[0].0.dims(), [3, 8, 8]);
        // Pure red → R channel 1, others −1, after resize and crop.
        let red: Vec<f32> = items[0].0.get(0)?.flatten_all()?.to_vec1()?;
        assert!(red.iter().all(|v| (*v - 1.0).abs() < 1e-6));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn images_with_txt_captions() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lcm-data-txt-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        write_png(&dir.join("x.png"), 8, 8, [0, 255, 0]);
        std::fs::write(dir.join("x.txt"), "a green square\n")?;
        let ex = scan(&dir)?;
        assert_eq!(
            ex,
            vec![Example {
                image: dir.join("x.png"),
                caption: "a green square".into()
            }]
        );
        assert!(scan(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
