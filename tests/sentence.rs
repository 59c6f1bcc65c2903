//! The shipped sentence encoder (weights/minilm: all-MiniLM-L6-v2, f16 weights computed in f32)
//! against sentence-transformers 6.3.0 / transformers 5.25 / torch 2.15 on the same files
//! (tests/fixtures/minilm.safetensors, made by scripts/make_minilm_fixture.py).

mod common;

use std::path::PathBuf;

use candle_core::{Device, Tensor, D};
use common::max_abs_diff;
use lcm::model::sentence::{hub_folder, SentenceEncoder, DEFAULT_SENTENCE_ENCODER};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> (Vec<String>, std::collections::HashMap<String, Tensor>) {
    let path = root().join("tests/fixtures/minilm.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let sentences: Vec<String> =
        serde_json::from_str(meta.metadata().as_ref().unwrap().get("sentences").unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    (sentences, tensors)
}

#[test]
fn embeddings_equal_sentence_transformers() {
    let (sentences, want) = fixture();
    let enc = SentenceEncoder::open(DEFAULT_SENTENCE_ENCODER, &Device::Cpu).unwrap();
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    assert!(refs.len() >= 10);
    let got = enc.encode(&refs).unwrap();
    let d = max_abs_diff(&got.sentences, &want["embeddings"]);
    println!(
        "{} sentences: max |ours − sentence-transformers| = {d:.2e}",
        refs.len()
    );
    assert!(d < 1e-4, "sentence embeddings differ by {d}");
    // The first sentence's token states (its own length; the batch pads it to the longest).
    let states = &want["token_states_0"];
    let n0 = states.dim(0).unwrap();
    let ours = got.tokens.get(0).unwrap().narrow(0, 0, n0).unwrap();
    let d = max_abs_diff(&ours, states);
    println!("token states: max |Δ| = {d:.2e}");
    assert!(d < 1e-4, "token states differ by {d}");
    let real: f32 = got
        .mask
        .get(0)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(real as usize, n0);
    // What f16 storage costs against the original f32 weights (reported, bounded).
    let d32 = max_abs_diff(&got.sentences, &want["embeddings_f32_weights"]);
    println!("f16 weights vs the original f32: max |Δ| = {d32:.2e}");
    assert!(d32 < 1e-3, "{d32}");
}

#[test]
fn paraphrases_rank_above_other_actions() {
    let enc = SentenceEncoder::open(DEFAULT_SENTENCE_ENCODER, &Device::Cpu).unwrap();
    let e = enc
        .encode(&[
            "a person walks forward",
            "someone strolls ahead",
            "a person jumps backward",
        ])
        .unwrap()
        .sentences;
    let cos = |i: usize, j: usize| -> f32 {
        (e.get(i).unwrap() * e.get(j).unwrap())
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let (para, other) = (cos(0, 1), cos(0, 2));
    println!("cos(walk, stroll) = {para:.3}, cos(walk, jump backward) = {other:.3}");
    assert!(para > other, "{para} vs {other}");
    // Unit vectors.
    assert!((cos(1, 1) - 1.0).abs() < 1e-5);
}

/// The hub path: a local hf-hub cache in the real layout (refs/main → snapshot folder) holding
/// the encoder's files under `sentence-transformers/all-MiniLM-L6-v2`.
#[test]
fn a_hub_id_loads_from_the_cache_layout() {
    let cache_dir = std::env::temp_dir().join(format!("lcm-hub-minilm-{}", std::process::id()));
    let repo = cache_dir.join("models--sentence-transformers--all-MiniLM-L6-v2");
    let snap = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "sentence_bert_config.json",
    ] {
        let target = snap.join(f);
        if !target.exists() {
            std::os::unix::fs::symlink(root().join("weights/minilm").join(f), &target).unwrap();
        }
    }
    let cache = hf_hub::Cache::new(cache_dir.clone());
    let dir = hub_folder(&cache, "sentence-transformers/all-MiniLM-L6-v2").unwrap();
    assert_eq!(dir, snap);
    let enc = SentenceEncoder::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(enc.dim, 384);
    // A folder without the weights is refused with the missing file's name.
    let e = SentenceEncoder::load(&cache_dir, &Device::Cpu)
        .err()
        .unwrap();
    assert!(e.to_string().contains("config.json"), "{e}");
    std::fs::remove_dir_all(&cache_dir).ok();
}
