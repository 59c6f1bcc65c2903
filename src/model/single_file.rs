//! Single-file Stable Diffusion 1.x checkpoints in the original (LDM / CompVis) key layout —
//! `model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE),
//! `cond_stage_model.transformer.text_model.*` (CLIP) — read into our components and written
//! back.
//!
//! The renaming is data: [`UNetLayout::pairs`] and [`VaeLayout::pairs`] list (LDM prefix,
//! diffusers prefix) for every block of a layout, with the few sub-names that differ inside a
//! resnet or a VAE attention; both directions go through the same pairs. The layout (blocks,
//! layers, which blocks attend) is read from the tensors' names, the sizes from their shapes; what
//! tensors cannot tell follows SD1.5 (8 heads, GroupNorm 32, quick-GELU CLIP with 64-wide heads,
//! the scaled-linear schedule), overridable with a diffusers folder's configs.

use std::collections::{BTreeSet, HashMap};

use anyhow::{bail, Context, Result};

/// Top-level prefixes of the three components in an LDM checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const TEXT_PREFIX: &str = "cond_stage_model.transformer.";

/// A resnet's sub-names: (LDM, diffusers).
const UNET_RESNET: &[(&str, &str)] = &[
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];
const VAE_RESNET: &[(&str, &str)] = &[("nin_shortcut.", "conv_shortcut.")];
/// The VAE's mid-block attention: 1×1 convolutions in LDM, linear layers in diffusers.
const VAE_ATTENTION: &[(&str, &str)] = &[
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
];

/// What kind of block a prefix pair covers: which sub-names it renames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Names below the prefix are equal in both layouts.
    Same,
    UNetResnet,
    VaeResnet,
    /// Renamed, and the weights of q/k/v/out reshaped between [C, C, 1, 1] and [C, C].
    VaeAttention,
}

impl Part {
    fn subs(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Part::Same => &[],
            Part::UNetResnet => UNET_RESNET,
            Part::VaeResnet => VAE_RESNET,
            Part::VaeAttention => VAE_ATTENTION,
        }
    }
}

/// (LDM prefix, diffusers prefix, part) for every block of a component.
pub type Pairs = Vec<(String, String, Part)>;

/// Which direction a name goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToDiffusers,
    ToLdm,
}

/// A name in the other layout, and whether its tensor changes shape (a VAE attention weight).
pub fn rename(pairs: &Pairs, name: &str, dir: Direction) -> Option<(String, bool)> {
    // The longest matching prefix wins (`input_blocks.3.0.op.` before `input_blocks.3.0.`).
    let (from, to, part) = pairs
        .iter()
        .map(|(l, d, p)| match dir {
            Direction::ToDiffusers => (l, d, *p),
            Direction::ToLdm => (d, l, *p),
        })
        .filter(|(from, _, _)| name.starts_with(from.as_str()))
        .max_by_key(|(from, _, _)| from.len())?;
    let rest = &name[from.len()..];
    for &(l, d) in part.subs() {
        let (a, b) = match dir {
            Direction::ToDiffusers => (l, d),
            Direction::ToLdm => (d, l),
        };
        if let Some(tail) = rest.strip_prefix(a) {
            let reshape =
                part == Part::VaeAttention && tail == "weight" && a != "norm." && b != "norm.";
            return Some((format!("{to}{b}{tail}"), reshape));
        }
    }
    Some((format!("{to}{rest}"), false))
}

/// The distinct integers `k` of names `{prefix}{k}.…`.
fn indices<'a>(names: impl Iterator<Item = &'a str>, prefix: &str) -> BTreeSet<usize> {
    names
        .filter_map(|n| n.strip_prefix(prefix))
        .filter_map(|r| r.split('.').next()?.parse().ok())
        .collect()
}

/// The U-Net's block structure (SD1.5: 4 blocks of 2 layers, the first three attending down,
/// the last three up, attention in the middle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UNetLayout {
    pub layers: usize,
    /// Per resolution, highest first: whether the down block attends.
    pub down_attention: Vec<bool>,
    /// Per up block (diffusers order, lowest resolution first): whether it attends.
    pub up_attention: Vec<bool>,
    pub mid_attention: bool,
}

impl UNetLayout {
    /// Read from LDM U-Net names (without `model.diffusion_model.`).
    pub fn from_ldm(names: &[&str]) -> Result<Self> {
        let inputs = indices(names.iter().copied(), "input_blocks.");
        let outputs = indices(names.iter().copied(), "output_blocks.");
        let Some(&last_in) = inputs.last() else {
            bail!("no input_blocks.* tensors")
        };
        // The first downsampler sits right after the first block's layers.
        let first_down = inputs.iter().copied().find(|&k| {
            names
                .iter()
                .any(|n| n.starts_with(&format!("input_blocks.{k}.0.op.")))
        });
        let layers = match first_down {
            Some(k) => k - 1,
            None => last_in,
        };
        if layers == 0 || !(last_in + 1).is_multiple_of(layers + 1) {
            bail!("input_blocks 0..={last_in} do not form blocks of equal layers")
        }
        let blocks = (last_in + 1) / (layers + 1);
        if outputs.len() != blocks * (layers + 1) {
            bail!(
                "{} output_blocks, expected {} for {blocks} blocks of {layers} layers",
                outputs.len(),
                blocks * (layers + 1)
            )
        }
        let has = |p: String| names.iter().any(|n| n.starts_with(&p));
        Ok(Self {
            layers,
            down_attention: (0..blocks)
                .map(|i| has(format!("input_blocks.{}.1.", 1 + i * (layers + 1))))
                .collect(),
            up_attention: (0..blocks)
                .map(|i| has(format!("output_blocks.{}.1.", i * (layers + 1))))
                .collect(),
            mid_attention: has("middle_block.2.".into()),
        })
    }

    pub fn blocks(&self) -> usize {
        self.down_attention.len()
    }

    /// Every (LDM, diffusers) prefix of this layout.
    pub fn pairs(&self) -> Pairs {
        let (n, l) = (self.blocks(), self.layers);
        let mut p: Pairs = Vec::new();
        let mut add = |a: String, b: String, part: Part| p.push((a, b, part));
        add(
            "time_embed.0.".into(),
            "time_embedding.linear_1.".into(),
            Part::Same,
        );
        add(
            "time_embed.2.".into(),
            "time_embedding.linear_2.".into(),
            Part::Same,
        );
        // The guidance embedding of an LCM: diffusers' conversion script leaves its name as is.
        add(
            "time_embedding.cond_proj.".into(),
            "time_embedding.cond_proj.".into(),
            Part::Same,
        );
        add("input_blocks.0.0.".into(), "conv_in.".into(), Part::Same);
        add("out.0.".into(), "conv_norm_out.".into(), Part::Same);
        add("out.2.".into(), "conv_out.".into(), Part::Same);
        for i in 0..n {
            for j in 0..l {
                let k = 1 + i * (l + 1) + j;
                add(
                    format!("input_blocks.{k}.0."),
                    format!("down_blocks.{i}.resnets.{j}."),
                    Part::UNetResnet,
                );
                if self.down_attention[i] {
                    add(
                        format!("input_blocks.{k}.1."),
                        format!("down_blocks.{i}.attentions.{j}."),
                        Part::Same,
                    );
                }
            }
            if i + 1 < n {
                add(
                    format!("input_blocks.{}.0.op.", (i + 1) * (l + 1)),
                    format!("down_blocks.{i}.downsamplers.0.conv."),
                    Part::Same,
                );
            }
            for j in 0..=l {
                let k = i * (l + 1) + j;
                add(
                    format!("output_blocks.{k}.0."),
                    format!("up_blocks.{i}.resnets.{j}."),
                    Part::UNetResnet,
                );
                if self.up_attention[i] {
                    add(
                        format!("output_blocks.{k}.1."),
                        format!("up_blocks.{i}.attentions.{j}."),
                        Part::Same,
                    );
                }
            }
            if i + 1 < n {
                let slot = if self.up_attention[i] { 2 } else { 1 };
                add(
                    format!("output_blocks.{}.{slot}.conv.", i * (l + 1) + l),
                    format!("up_blocks.{i}.upsamplers.0.conv."),
                    Part::Same,
                );
            }
        }
        add(
            "middle_block.0.".into(),
            "mid_block.resnets.0.".into(),
            Part::UNetResnet,
        );
        if self.mid_attention {
            add(
                "middle_block.1.".into(),
                "mid_block.attentions.0.".into(),
                Part::Same,
            );
            add(
                "middle_block.2.".into(),
                "mid_block.resnets.1.".into(),
                Part::UNetResnet,
            );
        } else {
            add(
                "middle_block.1.".into(),
                "mid_block.resnets.1.".into(),
                Part::UNetResnet,
            );
        }
        p
    }
}

/// The VAE's block structure (SD1.5: 4 blocks, 2 resnets down and 3 up per block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeLayout {
    pub blocks: usize,
    pub layers: usize,
}

impl VaeLayout {
    /// Read from LDM VAE names (without `first_stage_model.`).
    pub fn from_ldm(names: &[&str]) -> Result<Self> {
        let blocks = indices(names.iter().copied(), "encoder.down.").len();
        let layers = indices(names.iter().copied(), "encoder.down.0.block.").len();
        if blocks == 0 || layers == 0 {
            bail!("no encoder.down.N.block.M tensors")
        }
        Ok(Self { blocks, layers })
    }

    pub fn pairs(&self) -> Pairs {
        let (n, l) = (self.blocks, self.layers);
        let mut p: Pairs = Vec::new();
        let mut add = |a: String, b: String, part: Part| p.push((a, b, part));
        for name in ["quant_conv.", "post_quant_conv."] {
            add(name.into(), name.into(), Part::Same);
        }
        for side in ["encoder", "decoder"] {
            add(
                format!("{side}.conv_in."),
                format!("{side}.conv_in."),
                Part::Same,
            );
            add(
                format!("{side}.norm_out."),
                format!("{side}.conv_norm_out."),
                Part::Same,
            );
            add(
                format!("{side}.conv_out."),
                format!("{side}.conv_out."),
                Part::Same,
            );
            add(
                format!("{side}.mid.block_1."),
                format!("{side}.mid_block.resnets.0."),
                Part::VaeResnet,
            );
            add(
                format!("{side}.mid.attn_1."),
                format!("{side}.mid_block.attentions.0."),
                Part::VaeAttention,
            );
            add(
                format!("{side}.mid.block_2."),
                format!("{side}.mid_block.resnets.1."),
                Part::VaeResnet,
            );
        }
        for i in 0..n {
            for j in 0..l {
                add(
                    format!("encoder.down.{i}.block.{j}."),
                    format!("encoder.down_blocks.{i}.resnets.{j}."),
                    Part::VaeResnet,
                );
            }
            // LDM numbers the decoder's blocks from the lowest resolution up, diffusers from the
            // highest.
            let up = n - 1 - i;
            for j in 0..=l {
                add(
                    format!("decoder.up.{up}.block.{j}."),
                    format!("decoder.up_blocks.{i}.resnets.{j}."),
                    Part::VaeResnet,
                );
            }
            if i + 1 < n {
                add(
                    format!("encoder.down.{i}.downsample.conv."),
                    format!("encoder.down_blocks.{i}.downsamplers.0.conv."),
                    Part::Same,
                );
                add(
                    format!("decoder.up.{up}.upsample.conv."),
                    format!("decoder.up_blocks.{i}.upsamplers.0.conv."),
                    Part::Same,
                );
            }
        }
        p
    }
}

/// Every name kept as it is: the CLIP text model (the names below
/// `cond_stage_model.transformer.` are transformers' own, with or without `text_model.`, as the
/// saving version had it), and a separate VAE file already in diffusers' names.
pub fn identity_pairs() -> Pairs {
    vec![(String::new(), String::new(), Part::Same)]
}

/// Rename every name of `names` (all of one component, without its top-level prefix); the error
/// names the first that no pair covers.
pub fn rename_all<'a>(
    pairs: &Pairs,
    names: impl IntoIterator<Item = &'a str>,
    dir: Direction,
) -> Result<HashMap<String, (String, bool)>> {
    names
        .into_iter()
        .map(|n| {
            let to = rename(pairs, n, dir)
                .with_context(|| format!("tensor {n}: no counterpart in the other layout"))?;
            Ok((n.to_string(), to))
        })
        .collect()
}

/// Tensor shapes of one component, by name (the component's own names, LDM layout).
pub type Shapes = HashMap<String, Vec<usize>>;

fn dim(shapes: &Shapes, name: &str, axis: usize) -> Result<usize> {
    shapes
        .get(name)
        .and_then(|s| s.get(axis).copied())
        .with_context(|| {
            format!(
                "tensor {name} is missing or has fewer than {} axes",
                axis + 1
            )
        })
}

/// The U-Net's `config.json` from its LDM tensors: sizes from shapes, SD1.5's conventions for the
/// rest (8 heads, GroupNorm 32).
pub fn unet_config(shapes: &Shapes, layout: &UNetLayout) -> Result<serde_json::Value> {
    let l = layout.layers;
    let channels = (0..layout.blocks())
        .map(|i| {
            dim(
                shapes,
                &format!("input_blocks.{}.0.out_layers.3.weight", 1 + i * (l + 1)),
                0,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let attn = shapes
        .iter()
        .find(|(n, _)| n.ends_with(".attn2.to_k.weight"))
        .map(|(n, _)| n.clone());
    let cross = match &attn {
        Some(n) => dim(shapes, n, 1)?,
        None => bail!("no cross-attention (attn2.to_k) tensors: not a text-conditioned U-Net"),
    };
    let proj = shapes
        .iter()
        .find(|(n, _)| n.ends_with(".proj_in.weight"))
        .map(|(_, s)| s.len());
    let depth = indices(
        shapes.keys().map(String::as_str),
        &format!("input_blocks.{}.1.transformer_blocks.", 1),
    )
    .len()
    .max(1);
    let down: Vec<&str> = layout
        .down_attention
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = layout
        .up_attention
        .iter()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
        .collect();
    let cond_proj = shapes.get("time_embedding.cond_proj.weight").map(|s| s[1]);
    Ok(serde_json::json!({
        "_class_name": "UNet2DConditionModel",
        "in_channels": dim(shapes, "input_blocks.0.0.weight", 1)?,
        "out_channels": dim(shapes, "out.2.weight", 0)?,
        "conv_in_kernel": dim(shapes, "input_blocks.0.0.weight", 2)?,
        "conv_out_kernel": dim(shapes, "out.2.weight", 2)?,
        "block_out_channels": channels,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": if layout.mid_attention { "UNetMidBlock2DCrossAttn" } else { "UNetMidBlock2D" },
        "layers_per_block": l,
        "attention_head_dim": 8,
        "cross_attention_dim": cross,
        "norm_num_groups": 32,
        "use_linear_projection": proj == Some(2),
        "transformer_layers_per_block": depth,
        "time_cond_proj_dim": cond_proj,
        "sample_size": 64,
    }))
}

/// The VAE's `config.json` from its LDM tensors (SD1.5's GroupNorm 32 and scaling factor).
pub fn vae_config(shapes: &Shapes, layout: &VaeLayout) -> Result<serde_json::Value> {
    let channels = (0..layout.blocks)
        .map(|i| {
            dim(
                shapes,
                &format!("encoder.down.{i}.block.{}.conv2.weight", layout.layers - 1),
                0,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(serde_json::json!({
        "_class_name": "AutoencoderKL",
        "in_channels": dim(shapes, "encoder.conv_in.weight", 1)?,
        "out_channels": dim(shapes, "decoder.conv_out.weight", 0)?,
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; layout.blocks],
        "up_block_types": vec!["UpDecoderBlock2D"; layout.blocks],
        "layers_per_block": layout.layers,
        "latent_channels": dim(shapes, "decoder.conv_in.weight", 1)?,
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
        "use_quant_conv": shapes.contains_key("quant_conv.weight"),
        "use_post_quant_conv": shapes.contains_key("post_quant_conv.weight"),
        "mid_block_add_attention": shapes.contains_key("encoder.mid.attn_1.q.weight"),
        "sample_size": 512,
    }))
}

/// The CLIP text model's `config.json` from its tensors (heads 64 wide, quick-GELU, as CLIP).
pub fn text_config(shapes: &Shapes) -> Result<serde_json::Value> {
    let m = if shapes.contains_key("text_model.embeddings.token_embedding.weight") {
        "text_model."
    } else {
        ""
    };
    let e = format!("{m}embeddings.");
    let hidden = dim(shapes, &format!("{e}token_embedding.weight"), 1)?;
    let layers = indices(
        shapes.keys().map(String::as_str),
        &format!("{m}encoder.layers."),
    )
    .len();
    if layers == 0 {
        bail!("no {m}encoder.layers.N tensors")
    }
    if !hidden.is_multiple_of(64) {
        bail!("text width {hidden} is not a multiple of CLIP's 64-wide heads")
    }
    Ok(serde_json::json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": dim(shapes, &format!("{e}token_embedding.weight"), 0)?,
        "hidden_size": hidden,
        "intermediate_size": dim(shapes, &format!("{m}encoder.layers.0.mlp.fc1.weight"), 0)?,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden / 64,
        "max_position_embeddings": dim(shapes, &format!("{e}position_embedding.weight"), 0)?,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }))
}

/// The layout of a diffusers U-Net config, for writing LDM names.
pub fn unet_layout_of(cfg: &super::config::UNetConfig) -> Result<UNetLayout> {
    let n = cfg.block_out_channels.len();
    let layers = match &cfg.layers_per_block {
        super::config::PerBlock::One(l) => *l,
        super::config::PerBlock::Many(v) if v.iter().all(|&l| l == v[0]) && !v.is_empty() => v[0],
        other => bail!("layers_per_block {other:?}: the LDM layout has one count for every block"),
    };
    let attends = |t: &String| t.contains("CrossAttn");
    if cfg.down_block_types.len() != n || cfg.up_block_types.len() != n {
        bail!(
            "{n} block channels but {} down and {} up block types",
            cfg.down_block_types.len(),
            cfg.up_block_types.len()
        )
    }
    Ok(UNetLayout {
        layers,
        down_attention: cfg.down_block_types.iter().map(attends).collect(),
        up_attention: cfg.up_block_types.iter().map(attends).collect(),
        mid_attention: cfg
            .mid_block_type
            .as_deref()
            .is_none_or(|t| t.contains("CrossAttn")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> UNetLayout {
        UNetLayout {
            layers: 2,
            down_attention: vec![true, true, true, false],
            up_attention: vec![false, true, true, true],
            mid_attention: true,
        }
    }

    /// Names of SD1.5's LDM layout as published checkpoints have them.
    #[test]
    fn sd15_names_map_to_diffusers_names() {
        let p = sd15().pairs();
        let to = |n: &str| rename(&p, n, Direction::ToDiffusers).unwrap().0;
        assert_eq!(
            to("input_blocks.1.0.in_layers.0.weight"),
            "down_blocks.0.resnets.0.norm1.weight"
        );
        assert_eq!(
            to("input_blocks.3.0.op.weight"),
            "down_blocks.0.downsamplers.0.conv.weight"
        );
        assert_eq!(
            to("input_blocks.11.0.out_layers.3.bias"),
            "down_blocks.3.resnets.1.conv2.bias"
        );
        assert_eq!(
            to("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"),
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        );
        assert_eq!(
            to("input_blocks.4.0.skip_connection.weight"),
            "down_blocks.1.resnets.0.conv_shortcut.weight"
        );
        assert_eq!(
            to("output_blocks.2.1.conv.weight"),
            "up_blocks.0.upsamplers.0.conv.weight"
        );
        assert_eq!(
            to("output_blocks.5.2.conv.bias"),
            "up_blocks.1.upsamplers.0.conv.bias"
        );
        assert_eq!(
            to("output_blocks.8.2.conv.bias"),
            "up_blocks.2.upsamplers.0.conv.bias"
        );
        assert_eq!(
            to("output_blocks.11.1.proj_out.weight"),
            "up_blocks.3.attentions.2.proj_out.weight"
        );
        assert_eq!(
            to("middle_block.1.norm.weight"),
            "mid_block.attentions.0.norm.weight"
        );
        assert_eq!(
            to("middle_block.2.emb_layers.1.weight"),
            "mid_block.resnets.1.time_emb_proj.weight"
        );
        assert_eq!(to("time_embed.2.bias"), "time_embedding.linear_2.bias");
        assert_eq!(to("out.2.weight"), "conv_out.weight");
        assert!(rename(&p, "label_emb.0.0.weight", Direction::ToDiffusers).is_none());
        // And back.
        let back = |n: &str| rename(&p, n, Direction::ToLdm).unwrap().0;
        assert_eq!(
            back("up_blocks.1.upsamplers.0.conv.bias"),
            "output_blocks.5.2.conv.bias"
        );
        assert_eq!(
            back("down_blocks.0.resnets.0.norm1.weight"),
            "input_blocks.1.0.in_layers.0.weight"
        );
    }

    #[test]
    fn the_layout_is_read_back_from_its_own_names() {
        for layout in [
            sd15(),
            UNetLayout {
                layers: 1,
                down_attention: vec![true, false],
                up_attention: vec![false, true],
                mid_attention: true,
            },
        ] {
            let names: Vec<String> = layout
                .pairs()
                .iter()
                .map(|(l, _, _)| format!("{l}weight"))
                .collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            assert_eq!(UNetLayout::from_ldm(&refs).unwrap(), layout);
        }
    }

    #[test]
    fn vae_names_map_both_ways_with_attention_reshaped() {
        let p = VaeLayout {
            blocks: 4,
            layers: 2,
        }
        .pairs();
        let to = |n: &str| rename(&p, n, Direction::ToDiffusers).unwrap();
        assert_eq!(
            to("decoder.up.3.block.2.nin_shortcut.weight").0,
            "decoder.up_blocks.0.resnets.2.conv_shortcut.weight"
        );
        assert_eq!(
            to("decoder.up.0.block.0.norm1.bias").0,
            "decoder.up_blocks.3.resnets.0.norm1.bias"
        );
        assert_eq!(
            to("decoder.up.1.upsample.conv.weight").0,
            "decoder.up_blocks.2.upsamplers.0.conv.weight"
        );
        assert_eq!(
            to("encoder.down.2.downsample.conv.weight").0,
            "encoder.down_blocks.2.downsamplers.0.conv.weight"
        );
        assert_eq!(
            to("encoder.mid.attn_1.q.weight"),
            ("encoder.mid_block.attentions.0.to_q.weight".into(), true)
        );
        assert_eq!(
            to("encoder.mid.attn_1.q.bias"),
            ("encoder.mid_block.attentions.0.to_q.bias".into(), false)
        );
        assert_eq!(
            to("decoder.mid.attn_1.norm.weight"),
            (
                "decoder.mid_block.attentions.0.group_norm.weight".into(),
                false
            )
        );
        assert_eq!(
            to("decoder.mid.attn_1.proj_out.weight").0,
            "decoder.mid_block.attentions.0.to_out.0.weight"
        );
        assert_eq!(
            to("encoder.norm_out.weight").0,
            "encoder.conv_norm_out.weight"
        );
        let back = rename(
            &p,
            "decoder.mid_block.attentions.0.to_out.0.weight",
            Direction::ToLdm,
        )
        .unwrap();
        assert_eq!(back, ("decoder.mid.attn_1.proj_out.weight".into(), true));
    }
}
