//! Image–caption datasets for training, in the Hugging Face imagefolder convention: a folder with
//! `metadata.jsonl` (`{"file_name": …, "text": …}` per line), or images with a same-name `.txt`
//! caption beside them, or webdataset-style `.tar` shards (members sharing a key: `KEY.png|jpg`
//! with `KEY.txt`, or `KEY.json` holding `text`/`caption`/`prompt`). Images are resized (shorter
//! side → resolution, bilinear) and centre-cropped as diffusers' training scripts do. An
//! unreadable image is skipped and reported, never fatal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::imageops::FilterType;

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The image file, or the `.tar` shard holding it.
    pub image: PathBuf,
    pub caption: String,
    /// For a shard member: its name and bytes (shards are read once, whole).
    pub member: Option<(String, Arc<Vec<u8>>)>,
}

impl Example {
    /// How to name this example in messages.
    pub fn label(&self) -> String {
        match &self.member {
            Some((name, _)) => format!("{}:{name}", self.image.display()),
            None => self.image.display().to_string(),
        }
    }

    /// Identity for caches: path, size and modification time (and the member name).
    pub fn fingerprint(&self) -> String {
        let meta = std::fs::metadata(&self.image)
            .map(|m| format!("{}:{:?}", m.len(), m.modified().ok()))
            .unwrap_or_else(|_| "missing".into());
        format!("{}:{meta}:{}", self.label(), self.caption)
    }
}

fn caption_from_json(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    ["text", "caption", "prompt"]
        .iter()
        .find_map(|k| v[*k].as_str().map(str::to_string))
}

/// One webdataset key's image member (name, bytes) and caption.
type ShardGroup = (Option<(String, Vec<u8>)>, Option<String>);

/// Examples of one webdataset shard, by key.
fn scan_shard(path: &Path) -> Result<Vec<Example>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut archive = tar::Archive::new(file);
    let mut groups: BTreeMap<String, ShardGroup> = BTreeMap::new();
    for entry in archive
        .entries()
        .with_context(|| format!("{}: not a tar archive", path.display()))?
    {
        let mut entry = entry.with_context(|| format!("{}: corrupt tar entry", path.display()))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path()?.to_string_lossy().into_owned();
        // webdataset: the key is the member path up to the first dot of its file name.
        let (dir, base) = name
            .rsplit_once('/')
            .map_or(("", name.as_str()), |(d, b)| (d, b));
        let Some((stem, ext)) = base.split_once('.') else {
            continue;
        };
        let key = if dir.is_empty() {
            stem.to_string()
        } else {
            format!("{dir}/{stem}")
        };
        let ext = ext.to_ascii_lowercase();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes)
            .with_context(|| format!("{}: cannot read {name}", path.display()))?;
        let slot = groups.entry(key).or_default();
        if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            slot.0 = Some((name, bytes));
        } else if ext == "txt" || ext == "caption" {
            slot.1 = Some(String::from_utf8_lossy(&bytes).trim().to_string());
        } else if ext == "json" && slot.1.is_none() {
            slot.1 = caption_from_json(&bytes);
        }
    }
    Ok(groups
        .into_values()
        .filter_map(|(img, caption)| {
            let (name, bytes) = img?;
            Some(Example {
                image: path.to_path_buf(),
                caption: caption.unwrap_or_default(),
                member: Some((name, Arc::new(bytes))),
            })
        })
        .collect())
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
                member: None,
            });
        }
    } else if let Some(shards) = tar_shards(dir)? {
        for shard in shards {
            out.extend(scan_shard(&shard)?);
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
            out.push(Example {
                image,
                caption,
                member: None,
            });
        }
    }
    out.sort_by_key(|e| e.label());
    if out.is_empty() {
        bail!(
            "--data: no images in {} (expected metadata.jsonl or images with .txt captions)",
            dir.display()
        )
    }
    Ok(out)
}

/// The sorted `.tar` files of a folder, or `None` when it has none.
fn tar_shards(dir: &Path) -> Result<Option<Vec<PathBuf>>> {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    shards.sort();
    Ok((!shards.is_empty()).then_some(shards))
}

/// Read an image, resize its shorter side to `resolution`, centre-crop to a square and return a
/// `[3, resolution, resolution]` f32 tensor in [−1, 1].
pub fn load_image(path: &Path, resolution: usize, device: &Device) -> Result<Tensor> {
    let img = image::open(path).with_context(|| format!("cannot decode {}", path.display()))?;
    image_tensor(
        img.to_rgb8(),
        &path.display().to_string(),
        resolution,
        device,
    )
}

/// [`load_image`] for any example (a file or a shard member).
pub fn load_example(ex: &Example, resolution: usize, device: &Device) -> Result<Tensor> {
    match &ex.member {
        None => load_image(&ex.image, resolution, device),
        Some((_, bytes)) => {
            let img = image::load_from_memory(bytes)
                .with_context(|| format!("cannot decode {}", ex.label()))?;
            image_tensor(img.to_rgb8(), &ex.label(), resolution, device)
        }
    }
}

/// An image resized (shorter side) and centre-cropped to `resolution`², as `[3, r, r]` in [−1, 1];
/// `label` names it in errors.
pub fn image_tensor(
    img: image::RgbImage,
    label: &str,
    resolution: usize,
    device: &Device,
) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        bail!("{label} is empty")
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
        match load_example(ex, resolution, device) {
            Ok(t) => {
                out.push((t, ex.caption.clone()));
                report.loaded += 1;
            }
            Err(e) => {
                eprintln!("warning: skipping {}: {e:#}", ex.label());
                report
                    .skipped
                    .push((PathBuf::from(ex.label()), format!("{e:#}")));
            }
        }
    }
    (out, report)
}

/// Every image of the given folders as one `[n, 3, r, r]` tensor in [−1, 1], plus the captions.
pub fn load_images(dirs: &[PathBuf], resolution: usize) -> Result<(Tensor, Vec<String>)> {
    let mut images = Vec::new();
    let mut captions = Vec::new();
    let mut skipped = 0;
    for dir in dirs {
        let examples = scan(dir)?;
        let (loaded, report) = load_all(&examples, resolution, &Device::Cpu);
        skipped += report.skipped.len();
        for (t, c) in loaded {
            images.push(t);
            captions.push(c);
        }
    }
    if images.is_empty() {
        bail!("--data: no readable images")
    }
    if skipped > 0 {
        eprintln!("warning: {skipped} unreadable images skipped");
    }
    Ok((Tensor::stack(&images, 0)?, captions))
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
                caption: "a green square".into(),
                member: None,
            }]
        );
        assert!(scan(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn webdataset_shards_with_txt_and_json_captions() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lcm-data-wds-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let png = |rgb: [u8; 3]| -> Vec<u8> {
            let mut out = std::io::Cursor::new(Vec::new());
            image::RgbImage::from_pixel(8, 8, image::Rgb(rgb))
                .write_to(&mut out, image::ImageFormat::Png)
                .unwrap();
            out.into_inner()
        };
        let mut b = tar::Builder::new(std::fs::File::create(dir.join("shard-000.tar"))?);
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        add("s/0001.png", &png([255, 0, 0]));
        add("s/0001.txt", b"a red square");
        add("s/0002.png", &png([0, 0, 255]));
        add(
            "s/0002.json",
            br#"{"caption": "a blue square", "width": 8}"#,
        );
        add("s/0003.png", b"broken");
        add("s/0003.txt", b"broken");
        add("s/0004.txt", b"caption without an image");
        b.finish()?;
        drop(b);
        let ex = scan(&dir)?;
        assert_eq!(
            ex.iter().map(|e| e.caption.as_str()).collect::<Vec<_>>(),
            ["a red square", "a blue square", "broken"]
        );
        assert!(ex[0].label().ends_with("shard-000.tar:s/0001.png"));
        let (items, report) = load_all(&ex, 4, &Device::Cpu);
        assert_eq!((report.loaded, report.skipped.len()), (2, 1));
        let blue: Vec<f32> = items[1].0.get(2)?.flatten_all()?.to_vec1()?;
        assert!(blue.iter().all(|v| (*v - 1.0).abs() < 1e-6));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
