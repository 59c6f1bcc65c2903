//! CLIP BPE tokenizer through the `tokenizers` crate: from tokenizer/tokenizer.json where the
//! folder has one, else assembled from vocab.json + merges.txt (stable-diffusion-v1-5/stable-diffusion-v1-5
//! ships only those) with the same normalizer, regex split, byte-level BPE and bos/eos wrapping
//! that transformers' CLIPTokenizerFast uses. Output: exactly `max_len` ids, padded with the pad
//! token, truncated to bos + first (max_len − 2) tokens + eos with a warning.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The result of tokenizing one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    /// Exactly `max_len` ids.
    pub ids: Vec<u32>,
    /// How many tokens of the prompt did not fit and were dropped.
    pub dropped: usize,
}

pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
}

impl ClipTokenizer {
    /// Load from a diffusers `tokenizer/` folder. `max_len` is the text encoder's context length.
    pub fn from_dir(dir: &Path, max_len: usize) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let inner = if json.exists() {
            Tokenizer::from_file(&json)
                .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", json.display()))?
        } else {
            Self::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt"))?
        };
        let pad_name = read_pad_token(dir).unwrap_or_else(|| EOS.to_string());
        Self::new(inner, &pad_name, max_len)
            .with_context(|| format!("tokenizer in {}", dir.display()))
    }

    fn new(inner: Tokenizer, pad_name: &str, max_len: usize) -> Result<Self> {
        if max_len < 2 {
            bail!("context length {max_len} is too short for bos + eos")
        }
        let id = |name: &str| {
            inner
                .token_to_id(name)
                .ok_or_else(|| anyhow!("token {name:?} is not in the vocabulary"))
        };
        Ok(Self {
            bos: id(BOS)?,
            eos: id(EOS)?,
            pad: id(pad_name)?,
            inner,
            max_len,
        })
    }

    fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
        for f in [vocab, merges] {
            if !f.exists() {
                bail!(
                    "{} not found (and no tokenizer.json beside it)",
                    f.display()
                )
            }
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .unk_token(EOS.into())
            .end_of_word_suffix("</w>".into())
            .continuing_subword_prefix(String::new())
            .build()
            .map_err(|e| anyhow!("cannot build BPE from {}: {e}", vocab.display()))?;
        let mut tok = Tokenizer::new(bpe);
        let ws = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| anyhow!("{e}"))?;
        tok.with_normalizer(Some(NormSeq::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Replace(ws),
            NormalizerWrapper::Lowercase(Lowercase),
        ])))
        .map_err(|e| anyhow!("{e}"))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| anyhow!("{e}"))?;
        tok.with_pre_tokenizer(Some(PreSeq::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ])));
        tok.with_decoder(Some(ByteLevel::default()));
        let id = |t: &str| {
            tok.token_to_id(t)
                .ok_or_else(|| anyhow!("{t} missing from {}", vocab.display()))
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        tok.add_special_tokens([AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
            .map_err(|e| anyhow!("{e}"))?;
        tok.with_post_processor(Some(
            RobertaProcessing::new((EOS.into(), eos), (BOS.into(), bos))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        Ok(tok)
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The end-of-text id: CLIP pools the text at its first occurrence.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Ids of the prompt between bos and eos, unpadded and untruncated.
    pub fn raw_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| anyhow!("cannot tokenize prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// bos + prompt + eos, truncated and padded to the context length.
    pub fn encode(&self, prompt: &str) -> Result<Tokens> {
        let body = self.raw_ids(prompt)?;
        let room = self.max_len - 2;
        let dropped = body.len().saturating_sub(room);
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend_from_slice(&body[..body.len().min(room)]);
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(Tokens { ids, dropped })
    }

    /// Like [`encode`](Self::encode) but warns on stderr when the prompt was truncated.
    pub fn encode_warn(&self, prompt: &str) -> Result<Vec<u32>> {
        let t = self.encode(prompt)?;
        if t.dropped > 0 {
            eprintln!(
                "warning: prompt is {} tokens longer than the text encoder's {} and was truncated",
                t.dropped, self.max_len
            );
        }
        Ok(t.ids)
    }
}

/// The pad token named by tokenizer_config.json / special_tokens_map.json, if any.
fn read_pad_token(dir: &Path) -> Option<String> {
    for f in ["special_tokens_map.json", "tokenizer_config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(f)) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        match v.get("pad_token") {
            Some(serde_json::Value::String(s)) => return Some(s.clone()),
            Some(obj) => {
                if let Some(s) = obj.get("content").and_then(|c| c.as_str()) {
                    return Some(s.to_string());
                }
            }
            None => {}
        }
    }
    None
}
