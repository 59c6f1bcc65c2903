//! Stick figures of a clip, front and side views side by side: an animated GIF (one frame per
//! pose) or a PNG strip of evenly spaced poses, for model cards, sample grids and the API.
//!
//! Lines are drawn here (a disc stamped along each bone): the only drawing needed, not worth a
//! raster-graphics dependency.

use std::path::Path;

use anyhow::{bail, Context, Result};
use image::{Rgb, RgbImage};

use super::skeleton::{Pose, NAMES, PARENTS};

/// Pixels per view panel side.
const PANEL: u32 = 192;

fn colour(joint: usize) -> Rgb<u8> {
    let name = NAMES[joint];
    if name.starts_with("left") {
        Rgb([40, 90, 220])
    } else if name.starts_with("right") {
        Rgb([220, 50, 40])
    } else {
        Rgb([30, 30, 30])
    }
}

/// The two views' 2-D coordinates of a point: front (looking at a figure that faces +Z: its left,
/// +X, on the image's right) and side (looking from +X: forward, +Z, to the left).
fn views(p: &nalgebra::Vector3<f64>) -> [(f64, f64); 2] {
    [(p.x, p.y), (-p.z, p.y)]
}

/// Where the clip lies in each view: (min x, min y, scale) fitting every frame and the floor.
fn framing(joints: &[Pose]) -> [(f64, f64, f64); 2] {
    std::array::from_fn(|v| {
        let (mut lo, mut hi) = ((f64::MAX, 0f64), (f64::MIN, f64::MIN));
        for p in joints.iter().flatten() {
            let (x, y) = views(p)[v];
            lo = (lo.0.min(x), lo.1.min(y));
            hi = (hi.0.max(x), hi.1.max(y));
        }
        let side = (hi.0 - lo.0).max(hi.1 - lo.1).max(1e-6);
        let scale = (PANEL as f64 * 0.9) / side;
        // Centre horizontally within the panel.
        let x0 = lo.0 - ((PANEL as f64 / scale) - (hi.0 - lo.0)) / 2.0;
        (x0, lo.1 - 0.05 * PANEL as f64 / scale, scale)
    })
}

fn stamp(img: &mut RgbImage, x: f64, y: f64, r: f64, c: Rgb<u8>) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let ri = r.ceil() as i64;
    for dy in -ri..=ri {
        for dx in -ri..=ri {
            let (px, py) = (x.round() as i64 + dx, y.round() as i64 + dy);
            if (dx * dx + dy * dy) as f64 <= r * r && px >= 0 && py >= 0 && px < w && py < h {
                img.put_pixel(px as u32, py as u32, c);
            }
        }
    }
}

fn line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), r: f64, c: Rgb<u8>) {
    let steps = ((b.0 - a.0).hypot(b.1 - a.1)).ceil().max(1.0) as usize;
    for s in 0..=steps {
        let t = s as f64 / steps as f64;
        stamp(img, a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t, r, c);
    }
}

/// One pose, both views, on a white background with the floor line.
fn draw(pose: &Pose, frame: &[(f64, f64, f64); 2]) -> RgbImage {
    let mut img = RgbImage::from_pixel(2 * PANEL, PANEL, Rgb([255, 255, 255]));
    for (v, &(x0, y0, s)) in frame.iter().enumerate() {
        let off = (v as u32 * PANEL) as f64;
        let px = |p: (f64, f64)| (off + (p.0 - x0) * s, PANEL as f64 - (p.1 - y0) * s);
        let floor = px((0.0, 0.0)).1;
        line(
            &mut img,
            (off, floor),
            (off + PANEL as f64 - 1.0, floor),
            0.5,
            Rgb([170, 170, 170]),
        );
        for (j, parent) in PARENTS.iter().enumerate() {
            if let Some(p) = parent {
                let (a, b) = (views(&pose[*p])[v], views(&pose[j])[v]);
                line(&mut img, px(a), px(b), 1.6, colour(j));
            }
        }
        let head = px(views(&pose[15])[v]);
        stamp(&mut img, head.0, head.1, 4.0, Rgb([30, 30, 30]));
    }
    img
}

/// An animated GIF of the clip at `fps`.
pub fn write_gif(path: &Path, joints: &[Pose], fps: f64) -> Result<()> {
    write_gif_grid(path, &[joints], 1, fps)
}

/// An animated GIF of several clips in a grid of `cols` columns, row by row (e.g. originals
/// above their reconstructions), each framed on its own; a clip shorter than the longest holds
/// its last pose.
pub fn write_gif_grid<C: AsRef<[Pose]>>(
    path: &Path,
    clips: &[C],
    cols: usize,
    fps: f64,
) -> Result<()> {
    let bytes = gif_grid_bytes(clips, cols, fps).with_context(|| path.display().to_string())?;
    crate::files::write_atomic(path, &bytes)
}

/// The bytes of [`write_gif_grid`]'s GIF.
pub fn gif_grid_bytes<C: AsRef<[Pose]>>(clips: &[C], cols: usize, fps: f64) -> Result<Vec<u8>> {
    let clips: Vec<&[Pose]> = clips.iter().map(AsRef::as_ref).collect();
    if clips.is_empty() || clips.iter().any(|c| c.is_empty()) {
        bail!("no frames to render")
    }
    let frames: Vec<_> = clips.iter().map(|c| framing(c)).collect();
    let n = clips.iter().map(|c| c.len()).max().unwrap_or(0);
    let delay = image::Delay::from_numer_denom_ms(1000, fps.round().max(1.0) as u32);
    let mut bytes = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new_with_speed(&mut bytes, 10);
        enc.set_repeat(image::codecs::gif::Repeat::Infinite)?;
        for t in 0..n {
            let tiles: Vec<RgbImage> = clips
                .iter()
                .zip(&frames)
                .map(|(c, f)| draw(&c[t.min(c.len() - 1)], f))
                .collect();
            let img = crate::pipeline::image_io::grid(&tiles, cols.clamp(1, clips.len()))?;
            let rgba = image::DynamicImage::ImageRgb8(img).into_rgba8();
            enc.encode_frame(image::Frame::from_parts(rgba, 0, 0, delay))
                .context("encoding a GIF frame")?;
        }
    }
    Ok(bytes)
}

/// `count` evenly spaced poses side by side (each with both views) as a PNG.
pub fn write_strip(path: &Path, joints: &[Pose], count: usize) -> Result<()> {
    crate::pipeline::image_io::save_png(&strip(joints, count)?, path)
}

/// Several clips' strips one above the other (e.g. an original above its reconstruction), each
/// framed on its own, as a PNG.
pub fn write_pairs(path: &Path, clips: &[Vec<Pose>], count: usize) -> Result<()> {
    let rows = clips
        .iter()
        .map(|c| strip(c, count))
        .collect::<Result<Vec<_>>>()?;
    crate::pipeline::image_io::save_png(&crate::pipeline::image_io::grid(&rows, 1)?, path)
}

/// `count` evenly spaced poses of a clip side by side.
fn strip(joints: &[Pose], count: usize) -> Result<RgbImage> {
    if joints.is_empty() || count == 0 {
        bail!("no frames to render")
    }
    let frame = framing(joints);
    let tiles: Vec<RgbImage> = (0..count)
        .map(|i| {
            let t = if count == 1 {
                0
            } else {
                i * (joints.len() - 1) / (count - 1)
            };
            draw(&joints[t], &frame)
        })
        .collect();
    crate::pipeline::image_io::grid(&tiles, count)
}
