//! A pretrained sentence encoder for motion captions: all-MiniLM-L6-v2 (BERT, 6 layers × 384,
//! WordPiece), so that phrasings never seen in training land near their meaning. BERT is
//! candle-transformers'; the tokenizer is the `tokenizers` crate's reading `tokenizer.json`; the
//! sentence vector is sentence-transformers' recipe: the mean of the token states over the
//! attention mask, L2-normalised. The per-token states are exposed too (a sentence vector blurs
//! "left" and "right", and counts).
//!
//! The shipped copy (`weights/minilm`, the weights in f16, computed in f32) is the default; a
//! folder or a hub id (`sentence-transformers/all-MiniLM-L6-v2`, through hf-hub's cache) also
//! loads.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::config::read_json;
use super::weights::tensors;

/// The shipped encoder's name (`weights/minilm`).
pub const DEFAULT_SENTENCE_ENCODER: &str = "minilm";

/// BERT's weights for candle-transformers, in f32. On the CPU each linear layer's `[out, in]`
/// weight is handed over as a transposed view of an `[in, out]` copy: candle's linear multiplies
/// by the weight's transpose, which is then contiguous, and the `gemm` crate is several times
/// faster with that operand row-major (see [`crate::kernels::linear`]). The values are the same.
fn bert_weights(file: &Path, device: &Device) -> Result<candle_nn::VarBuilder<'static>> {
    let mut weights = tensors(&[file.to_path_buf()], device)?;
    for (name, w) in weights.iter_mut() {
        *w = w.to_dtype(DType::F32)?;
        let linear = name.ends_with(".weight") && !name.contains("embeddings") && w.rank() == 2;
        if linear && device.is_cpu() {
            *w = crate::kernels::transpose::transposed(w)?.t()?;
        }
    }
    Ok(candle_nn::VarBuilder::from_tensors(
        weights,
        DType::F32,
        device,
    ))
}

/// The files an encoder folder needs.
const FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// A batch of encoded sentences.
pub struct Encoded {
    /// `[n, d]`, unit length.
    pub sentences: Tensor,
    /// `[n, tokens, d]`: the last layer's states (padding rows included; see `mask`).
    pub tokens: Tensor,
    /// `[n, tokens]`: 1 for real tokens, 0 for padding (f32).
    pub mask: Tensor,
}

pub struct SentenceEncoder {
    bert: BertModel,
    tokenizer: Tokenizer,
    /// Width of the states and the sentence vector.
    pub dim: usize,
    /// Most tokens a sentence keeps (special tokens included); the rest is cut.
    pub max_len: usize,
    device: Device,
}

impl SentenceEncoder {
    /// Load a folder with `config.json`, `tokenizer.json` and `model.safetensors` (any float
    /// width; computed in f32). Sentences are cut at `sentence_bert_config.json`'s
    /// `max_seq_length` tokens (256 when the file is absent).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        for f in FILES {
            if !dir.join(f).is_file() {
                bail!("{} is missing", dir.join(f).display())
            }
        }
        let config: Config = read_json(&dir.join("config.json"))?;
        let max_len = match read_json::<serde_json::Value>(&dir.join("sentence_bert_config.json")) {
            Ok(v) => v["max_seq_length"].as_u64().unwrap_or(256) as usize,
            Err(_) => 256,
        };
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow!("{}: {e}", dir.join("tokenizer.json").display()))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| anyhow!("{}: {e}", dir.display()))?;
        let bert = BertModel::load(
            bert_weights(&dir.join("model.safetensors"), device)?,
            &config,
        )
        .with_context(|| format!("BERT weights in {}", dir.display()))?;
        Ok(Self {
            bert,
            tokenizer,
            dim: config.hidden_size,
            max_len,
            device: device.clone(),
        })
    }

    /// `spec`: a folder, `minilm` (the shipped copy) or a hub id (from hf-hub's cache, else
    /// downloaded unless `HF_HUB_OFFLINE` is set).
    pub fn open(spec: &str, device: &Device) -> Result<Self> {
        let dir = if Path::new(spec).is_dir() {
            PathBuf::from(spec)
        } else if spec == DEFAULT_SENTENCE_ENCODER {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/minilm")
        } else if spec.split('/').count() == 2 {
            hub_folder(&hf_hub::Cache::from_env(), spec)?
        } else {
            bail!("sentence encoder {spec:?} is neither a folder, `minilm` nor a hub id (org/name)")
        };
        Self::load(&dir, device)
    }

    /// Whether `sentence` is longer than [`max_len`](Self::max_len) tokens (and would be cut).
    pub fn truncates(&self, sentence: &str) -> Result<bool> {
        let enc = self
            .tokenizer
            .encode(sentence, true)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(!enc.get_overflowing().is_empty())
    }

    /// Encode a batch of sentences.
    pub fn encode(&self, sentences: &[&str]) -> Result<Encoded> {
        if sentences.is_empty() {
            bail!("no sentences to encode")
        }
        let enc = self
            .tokenizer
            .encode_batch(sentences.to_vec(), true)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let (n, len) = (enc.len(), enc[0].get_ids().len());
        let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<u32> = enc
            .iter()
            .flat_map(|e| e.get_attention_mask().to_vec())
            .collect();
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let states = self.bert.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
        let maskf = mask.to_dtype(DType::F32)?;
        let summed = states.broadcast_mul(&maskf.unsqueeze(2)?)?.sum(1)?;
        let counts = maskf.sum_keepdim(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        Ok(Encoded {
            sentences: mean.broadcast_div(&norm)?,
            tokens: states,
            mask: maskf,
        })
    }
}

/// The snapshot folder of hub repo `id` holding every file an encoder needs: from `cache` when
/// all are there, else downloaded into it (unless `HF_HUB_OFFLINE` is set).
pub fn hub_folder(cache: &hf_hub::Cache, id: &str) -> Result<PathBuf> {
    let repo = hf_hub::Repo::model(id.to_string());
    let cached: Option<Vec<PathBuf>> = FILES
        .iter()
        .map(|f| cache.repo(repo.clone()).get(f))
        .collect();
    if let Some(files) = cached {
        return files[0]
            .parent()
            .map(Path::to_path_buf)
            .context("hub cache layout");
    }
    let offline = crate::model::folder::hub_offline();
    if offline {
        bail!(
            "{id} is not in the hub cache {} and HF_HUB_OFFLINE is set",
            cache.path().display()
        )
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .build()?
        .repo(repo);
    let mut dir = None;
    for f in FILES.iter().chain(&["sentence_bert_config.json"]) {
        match api.get(f) {
            Ok(p) => dir = p.parent().map(Path::to_path_buf),
            Err(e) if FILES.contains(f) => bail!("cannot fetch {f} of {id} from the hub: {e}"),
            Err(_) => {}
        }
    }
    dir.context("hub download gave no folder")
}
