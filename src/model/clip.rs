//! CLIP text encoder (transformers `CLIPTextModel`): token + position embeddings, pre-LayerNorm
//! transformer blocks with a causal mask, final LayerNorm; returns `last_hidden_state`.
//!
//! Stable Diffusion pipelines attend to the padding tokens (no attention mask), so neither do we.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::model::config::ClipTextConfig;
use crate::nn::{self, LayerNorm, Linear};

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            // x·σ(1.702x), the activation of the original CLIP.
            Activation::QuickGelu => crate::nn::quick_gelu(xs),
            Activation::Gelu => crate::nn::gelu(xs),
        }
    }
}

struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl SelfAttention {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q: nn::linear(d, d, true, vb.pp("q_proj"))?,
            k: nn::linear(d, d, true, vb.pp("k_proj"))?,
            v: nn::linear(d, d, true, vb.pp("v_proj"))?,
            out: nn::linear(d, d, true, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let q = nn::split_heads(&self.q.forward(xs)?, self.heads)?;
        let k = nn::split_heads(&self.k.forward(xs)?, self.heads)?;
        let v = nn::split_heads(&self.v.forward(xs)?, self.heads)?;
        let attn = nn::attention(&q, &k, &v, Some(causal_mask))?;
        self.out.forward(&nn::merge_heads(&attn, self.heads)?)
    }
}

struct EncoderLayer {
    ln1: LayerNorm,
    attn: SelfAttention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(cfg: &ClipTextConfig, act: Activation, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            ln1: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            attn: SelfAttention::new(cfg, vb.pp("self_attn"))?,
            ln2: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: nn::linear(d, cfg.intermediate_size, true, vb.pp("mlp").pp("fc1"))?,
            fc2: nn::linear(cfg.intermediate_size, d, true, vb.pp("mlp").pp("fc2"))?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let xs = (xs + self.attn.forward(&self.ln1.forward(xs)?, mask)?)?;
        let h = self.fc2.forward(
            &self
                .act
                .apply(&self.fc1.forward(&self.ln2.forward(&xs)?)?)?,
        )?;
        xs + h
    }
}

/// The text encoder. Weights under `text_model.` as transformers saves a `CLIPTextModel`.
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_ln: LayerNorm,
    pub config: ClipTextConfig,
}

impl ClipTextModel {
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let act = match cfg.hidden_act.as_str() {
            "gelu" => Activation::Gelu,
            _ => Activation::QuickGelu,
        };
        let emb = vb.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, act, vb.pp("encoder").pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let final_ln = LayerNorm::new(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            vb.pp("final_layer_norm"),
        )?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_ln,
            config: cfg.clone(),
        })
    }

    /// `ids`: `[b, n]` (u32 or i64) with n ≤ max_position_embeddings → `[b, n, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, n) = ids.dims2()?;
        if n > self.config.max_position_embeddings {
            candle_core::bail!(
                "text encoder: {n} tokens exceed max_position_embeddings {}",
                self.config.max_position_embeddings
            )
        }
        let pos = self.position_embedding.narrow(0, 0, n)?;
        let mut xs = self.token_embedding.forward(ids)?.broadcast_add(&pos)?;
        let mask = causal_mask(n, xs.dtype(), xs.device())?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask)?;
        }
        self.final_ln.forward(&xs)
    }
}

/// `[n, n]` additive mask: 0 on and below the diagonal, −inf above.
fn causal_mask(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (n, n), device)?.to_dtype(dtype)
}
