//! The project's own training data, written in the imagefolder layout that `lcm distill` and
//! `lcm pretrain` read (`metadata.jsonl` + PNGs):
//! - procedural shapes with exact attributes (shape, colour, size, position, background) and
//!   captions in several phrasings, generated deterministically from a seed, so prompt adherence
//!   can be checked exactly ([`crate::eval::prompts::parse_prompt`]);
//! - the Noto emoji PNGs of the npm package `emoji-datasource-google` with their names and
//!   categories as captions, composited onto white, with a held-out split.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub const SHAPES: &[&str] = &["circle", "square", "triangle", "star", "ring", "cross"];
pub const COLORS: &[(&str, [u8; 3])] = &[
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [240, 210, 40]),
    ("purple", [140, 60, 180]),
    ("orange", [245, 140, 30]),
    ("white", [245, 245, 245]),
    ("black", [25, 25, 25]),
];
pub const SIZES: &[&str] = &["small", "large"];
/// 3×3 grid positions, row-major; "center" is the middle.
pub const POSITIONS: &[&str] = &[
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
];

/// One shape image's ground truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShapeAttrs {
    pub shape: String,
    pub color: String,
    pub size: String,
    pub position: String,
    pub background: String,
}

fn rgb(name: &str) -> [u8; 3] {
    COLORS
        .iter()
        .find(|c| c.0 == name)
        .map_or([128; 3], |c| c.1)
}

fn position_phrase(pos: &str) -> String {
    match pos {
        "center" => "in the center".into(),
        "top" | "bottom" => format!("at the {pos}"),
        "left" | "right" => format!("on the {pos}"),
        _ => format!("at the {pos}"),
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// A caption in one of four phrasings (some leave attributes out, as real captions do).
pub fn caption(a: &ShapeAttrs, phrasing: usize) -> String {
    let pos = position_phrase(&a.position);
    match phrasing % 4 {
        0 => format!(
            "a {} {} {} {} on {} {} background",
            a.size,
            a.color,
            a.shape,
            pos,
            article(&a.background),
            a.background
        ),
        1 => format!(
            "{} background, {} {}, {}, {}",
            a.background,
            a.color,
            a.shape,
            a.size,
            a.position.replace(' ', "-")
        ),
        2 => format!(
            "{} {} {} on {}",
            article(&a.color),
            a.color,
            a.shape,
            a.background
        ),
        _ => format!(
            "{} {} {} {}, {} backdrop",
            a.size, a.color, a.shape, pos, a.background
        ),
    }
}

/// Draw random attributes (shape colour ≠ background).
pub fn random_attrs(rng: &mut ChaCha8Rng) -> ShapeAttrs {
    let color = rng.random_range(0..COLORS.len());
    let mut bg = rng.random_range(0..COLORS.len() - 1);
    if bg >= color {
        bg += 1;
    }
    ShapeAttrs {
        shape: SHAPES[rng.random_range(0..SHAPES.len())].into(),
        color: COLORS[color].0.into(),
        size: SIZES[rng.random_range(0..SIZES.len())].into(),
        position: POSITIONS[rng.random_range(0..POSITIONS.len())].into(),
        background: COLORS[bg].0.into(),
    }
}

fn inside(shape: &str, dx: f32, dy: f32, r: f32) -> bool {
    let d = (dx * dx + dy * dy).sqrt();
    match shape {
        "circle" => d <= r,
        "square" => dx.abs() <= 0.82 * r && dy.abs() <= 0.82 * r,
        "ring" => d <= r && d >= 0.58 * r,
        "cross" => {
            let arm = 0.3 * r;
            (dx.abs() <= arm && dy.abs() <= r) || (dy.abs() <= arm && dx.abs() <= r)
        }
        "triangle" => {
            // Equilateral, apex up at y = −r, base at y = +r/2 (image y grows downwards).
            let t = (dy + r) / (1.5 * r);
            (0.0..=1.0).contains(&t) && dx.abs() <= t * r * 0.866
        }
        "star" => {
            // Five points: the boundary radius swings between r and 0.45r with the angle.
            if d > r {
                return false;
            }
            let a = dy.atan2(dx) + std::f32::consts::FRAC_PI_2;
            let sector = std::f32::consts::TAU / 5.0;
            let t = (a.rem_euclid(sector) / sector - 0.5).abs() * 2.0; // 1 at a point, 0 between
            d <= 0.45 * r + 0.55 * r * t
        }
        _ => false,
    }
}

/// Render one image (4×4 supersampled for smooth edges), with a little jitter in place and size.
pub fn render(a: &ShapeAttrs, size: u32, rng: &mut ChaCha8Rng) -> RgbImage {
    let s = size as f32;
    let idx = POSITIONS.iter().position(|p| *p == a.position).unwrap_or(4);
    let (col, row) = ((idx % 3) as f32, (idx / 3) as f32);
    let r = if a.size == "small" { 0.13 } else { 0.21 } * s * rng.random_range(0.9..1.1);
    let cx = (0.2 + 0.3 * col) * s + rng.random_range(-0.03..0.03) * s;
    let cy = (0.2 + 0.3 * row) * s + rng.random_range(-0.03..0.03) * s;
    let (fg, bg) = (rgb(&a.color), rgb(&a.background));
    let ss = 4;
    RgbImage::from_fn(size, size, |x, y| {
        let mut hits = 0;
        for sy in 0..ss {
            for sx in 0..ss {
                let px = x as f32 + (sx as f32 + 0.5) / ss as f32;
                let py = y as f32 + (sy as f32 + 0.5) / ss as f32;
                if inside(&a.shape, px - cx, py - cy, r) {
                    hits += 1;
                }
            }
        }
        let f = hits as f32 / (ss * ss) as f32;
        Rgb(std::array::from_fn(|c| {
            (fg[c] as f32 * f + bg[c] as f32 * (1.0 - f)).round() as u8
        }))
    })
}

#[derive(Serialize)]
struct ShapeRow<'a> {
    file_name: String,
    text: String,
    #[serde(flatten)]
    attrs: &'a ShapeAttrs,
}

/// Write `count` shape images with metadata.jsonl (text + attributes) into `out`.
pub fn write_shapes(out: &Path, count: usize, size: u32, seed: u64) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut meta = Vec::new();
    for i in 0..count {
        let attrs = random_attrs(&mut rng);
        let img = render(&attrs, size, &mut rng);
        let name = format!("shape-{i:06}.png");
        crate::pipeline::image_io::save_png(&img, &out.join(&name))?;
        let row = ShapeRow {
            file_name: name,
            text: caption(&attrs, rng.random_range(0..4)),
            attrs: &attrs,
        };
        writeln!(meta, "{}", serde_json::to_string(&row)?)?;
    }
    crate::files::write_atomic(&out.join("metadata.jsonl"), &meta)
}

#[derive(Deserialize)]
struct EmojiEntry {
    name: Option<String>,
    short_names: Option<Vec<String>>,
    category: Option<String>,
    subcategory: Option<String>,
    image: String,
    #[serde(default)]
    has_img_google: bool,
}

/// Convert an unpacked `emoji-datasource-google` package (`package/emoji.json`,
/// `package/img/google/64/*.png`) into `out/train` and `out/heldout` (every `heldout_every`-th
/// emoji, by sort order), RGB on white at `size`².
pub fn write_emoji(package: &Path, out: &Path, size: u32, heldout_every: usize) -> Result<()> {
    let json = package.join("emoji.json");
    let text = std::fs::read_to_string(&json)
        .with_context(|| format!("cannot read {}", json.display()))?;
    let mut entries: Vec<EmojiEntry> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not the emoji-datasource list", json.display()))?;
    entries.retain(|e| e.has_img_google);
    entries.sort_by(|a, b| a.image.cmp(&b.image));
    if entries.is_empty() {
        bail!("{}: no emoji with Google images", json.display())
    }
    let img_dir = package.join("img/google/64");
    let mut metas = [Vec::new(), Vec::new()];
    let mut skipped = 0;
    for (i, e) in entries.iter().enumerate() {
        let split = usize::from(heldout_every > 0 && i % heldout_every == heldout_every - 1);
        let dir = out.join(["train", "heldout"][split]);
        std::fs::create_dir_all(&dir)?;
        let src = img_dir.join(&e.image);
        let Ok(img) = image::open(&src) else {
            skipped += 1;
            continue;
        };
        let rgba = img.to_rgba8();
        let flat = RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            let p = rgba.get_pixel(x, y).0;
            let a = p[3] as f32 / 255.0;
            Rgb(std::array::from_fn(|c| {
                (p[c] as f32 * a + 255.0 * (1.0 - a)).round() as u8
            }))
        });
        let flat =
            image::imageops::resize(&flat, size, size, image::imageops::FilterType::Triangle);
        crate::pipeline::image_io::save_png(&flat, &dir.join(&e.image))?;
        let name = e.name.clone().unwrap_or_default().to_lowercase();
        let shorts = e
            .short_names
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|s| s.replace('_', " "))
            .collect::<Vec<_>>()
            .join(", ");
        let cat = e.category.clone().unwrap_or_default().to_lowercase();
        let sub = e.subcategory.clone().unwrap_or_default().replace('-', " ");
        let text = format!("an emoji of {name} ({shorts}; {cat}, {sub})");
        writeln!(
            metas[split],
            "{}",
            serde_json::json!({"file_name": e.image, "text": text, "category": cat, "subcategory": sub})
        )?;
    }
    for (split, meta) in ["train", "heldout"].iter().zip(&metas) {
        crate::files::write_atomic(&out.join(split).join("metadata.jsonl"), meta)?;
    }
    if skipped > 0 {
        eprintln!("warning: {skipped} emoji images could not be read and were skipped");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_puts_the_shape_colour_where_the_position_says() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for (i, pos) in POSITIONS.iter().enumerate() {
            let a = ShapeAttrs {
                shape: "square".into(),
                color: "red".into(),
                size: "large".into(),
                position: pos.to_string(),
                background: "blue".into(),
            };
            let img = render(&a, 64, &mut rng);
            let (cx, cy) = (
                ((0.2 + 0.3 * (i % 3) as f32) * 64.0) as u32,
                ((0.2 + 0.3 * (i / 3) as f32) * 64.0) as u32,
            );
            assert_eq!(img.get_pixel(cx, cy).0, rgb("red"), "{pos}");
            // The opposite corner region stays background.
            let (ox, oy) = (63 - cx, 63 - cy);
            if *pos != "center" {
                assert_eq!(img.get_pixel(ox, oy).0, rgb("blue"), "{pos}");
            }
        }
    }

    #[test]
    fn generation_is_deterministic() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lcm-shapes-{}", std::process::id()));
        write_shapes(&dir.join("a"), 5, 32, 9)?;
        write_shapes(&dir.join("b"), 5, 32, 9)?;
        for f in ["metadata.jsonl", "shape-000003.png"] {
            assert_eq!(
                std::fs::read(dir.join("a").join(f))?,
                std::fs::read(dir.join("b").join(f))?
            );
        }
        std::fs::remove_dir_all(dir).ok();
        Ok(())
    }
}
