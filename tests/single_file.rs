//! Single-file SD1.x checkpoints (LDM layout). The fixture tests/fixtures/sd15-layout.safetensors
//! was written by diffusers' own conversion script from the diffusers folder beside it
//! (tests/fixtures/PROVENANCE.md): generation from the file equals generation from the folder,
//! `lcm convert` round-trips the file tensor for tensor, the configs read off the tensors are the
//! folder's, a distillation runs from the file, and bad files are refused in one line naming the
//! file and the tensor.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use common::fixtures;

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lcm-single-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn file() -> PathBuf {
    fixtures().join("sd15-layout.safetensors")
}

fn folder() -> PathBuf {
    fixtures().join("sd15-layout")
}

/// `lcm ARGS` with its conversion cache in `cache`.
fn lcm(cache: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lcm"))
        .args(args)
        .env("LCM_CACHE", cache)
        .env("CANDLE_NUM_THREADS", "1")
        .output()
        .unwrap()
}

fn ok(o: std::process::Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: std::process::Output) -> String {
    assert!(
        !o.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn generation_from_the_file_equals_generation_from_the_folder() {
    let dir = tmp("gen");
    let f = file();
    let run = |model: &str, extra: &[&str], out: &str| {
        let out = dir.join(out);
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "a red circle",
            "--steps",
            "3",
            "--seed",
            "5",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ok(lcm(&dir.join("cache"), &args));
        image::open(out).unwrap().to_rgb8()
    };
    let config = folder();
    let from_folder = run(folder().to_str().unwrap(), &[], "folder.png");
    let from_file = run(
        f.to_str().unwrap(),
        &["--config", config.to_str().unwrap()],
        "file.png",
    );
    assert_eq!(from_folder.dimensions(), (64, 64));
    assert!(
        from_folder.as_raw() == from_file.as_raw(),
        "the same model gave other pixels from its single file"
    );
    // The second use takes the cached conversion and gives the same image.
    let again = run(
        f.to_str().unwrap(),
        &["--config", config.to_str().unwrap()],
        "again.png",
    );
    assert!(again.as_raw() == from_file.as_raw());
    assert_eq!(
        std::fs::read_dir(dir.join("cache/single-file"))
            .unwrap()
            .count(),
        1
    );
    // --config and --vae belong to single files.
    let e = err(lcm(
        &dir.join("cache"),
        &[
            "generate",
            "--model",
            folder().to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--prompt",
            "x",
            "--output",
            dir.join("x.png").to_str().unwrap(),
        ],
    ));
    assert!(e.contains("single-file"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn convert_round_trips_the_file_tensor_for_tensor() {
    let dir = tmp("convert");
    let cache = dir.join("cache");
    let out = dir.join("folder");
    let config = folder();
    let text = ok(lcm(
        &cache,
        &[
            "convert",
            "--input",
            file().to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
    ));
    assert!(text.contains("958 tensors"), "{text}");
    // The folder holds the diffusers folder's tensors, names and values alike.
    for (part, weights) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ] {
        let (ours, theirs) = (
            load(&out.join(part).join(weights)),
            load(&folder().join(part).join(weights)),
        );
        let mut a: Vec<_> = ours.keys().collect();
        let mut b: Vec<_> = theirs.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{part}");
        for (k, t) in &ours {
            let d = common::max_abs_diff(t, &theirs[k]);
            assert_eq!(d, 0.0, "{part} {k}");
        }
    }
    // And back to one file: the original, tensor for tensor.
    let back = dir.join("back.safetensors");
    ok(lcm(
        &cache,
        &[
            "convert",
            "--input",
            out.to_str().unwrap(),
            "--output",
            back.to_str().unwrap(),
            "--to",
            "single-file",
        ],
    ));
    let (orig, again) = (load(&file()), load(&back));
    assert_eq!(orig.len(), again.len());
    for (k, t) in &orig {
        let u = again.get(k).unwrap_or_else(|| panic!("{k} lost"));
        assert_eq!((t.dims(), t.dtype()), (u.dims(), u.dtype()), "{k}");
        assert_eq!(common::max_abs_diff(t, u), 0.0, "{k}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Without --config, the U-Net's and the VAE's configs come from the tensors and SD1.5's
/// conventions, and equal what diffusers wrote for the folder; the text encoder, 32 wide, is not
/// SD1.5-shaped, and the message says to pass --config.
#[test]
fn configs_are_read_off_the_tensors() {
    use lcm::model::single_file::{unet_config, vae_config, UNetLayout, VaeLayout};
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(file()) }.unwrap();
    let shapes = |prefix: &str| -> HashMap<String, Vec<usize>> {
        st.tensors()
            .into_iter()
            .filter_map(|(n, v)| Some((n.strip_prefix(prefix)?.to_string(), v.shape().to_vec())))
            .collect()
    };
    let read = |p: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(folder().join(p).join("config.json")).unwrap())
            .unwrap()
    };
    let u = shapes("model.diffusion_model.");
    let names: Vec<&str> = u.keys().map(String::as_str).collect();
    let ours = unet_config(&u, &UNetLayout::from_ldm(&names).unwrap()).unwrap();
    let theirs = read("unet");
    for key in [
        "in_channels",
        "out_channels",
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "mid_block_type",
        "layers_per_block",
        "attention_head_dim",
        "cross_attention_dim",
        "norm_num_groups",
        "use_linear_projection",
        "transformer_layers_per_block",
        "time_cond_proj_dim",
    ] {
        assert_eq!(ours[key], theirs[key], "unet {key}");
    }
    let v = shapes("first_stage_model.");
    let names: Vec<&str> = v.keys().map(String::as_str).collect();
    let ours = vae_config(&v, &VaeLayout::from_ldm(&names).unwrap()).unwrap();
    let theirs = read("vae");
    for key in [
        "in_channels",
        "out_channels",
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "layers_per_block",
        "latent_channels",
        "norm_num_groups",
        "scaling_factor",
    ] {
        assert_eq!(ours[key], theirs[key], "vae {key}");
    }
    let dir = tmp("noconfig");
    let e = err(lcm(
        &dir,
        &[
            "convert",
            "--input",
            file().to_str().unwrap(),
            "--output",
            dir.join("out").to_str().unwrap(),
        ],
    ));
    assert!(
        e.contains("sd15-layout.safetensors") && e.contains("--config"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn distill_takes_a_single_file_teacher() {
    let dir = tmp("distill");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut meta = String::new();
    for (i, rgb) in [[220u8, 30, 30], [30, 200, 40]].iter().enumerate() {
        let img = image::RgbImage::from_pixel(64, 64, image::Rgb(*rgb));
        img.save(data.join(format!("{i}.png"))).unwrap();
        meta += &format!("{{\"file_name\": \"{i}.png\", \"text\": \"colour {i}\"}}\n");
    }
    std::fs::write(data.join("metadata.jsonl"), meta).unwrap();
    let out = dir.join("lcm");
    let config = folder();
    ok(lcm(
        &dir.join("cache"),
        &[
            "distill",
            "--teacher",
            file().to_str().unwrap(),
            "--teacher-config",
            config.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--warmup-steps",
            "1",
            "--w-embed-dim",
            "16",
            "--ddim-steps",
            "10",
            "--sample-every",
            "0",
        ],
    ));
    let losses = common::losses(&out.join("metrics.jsonl"));
    assert_eq!(losses.len(), 2);
    assert!(losses.iter().all(|l| l.1.is_finite()), "{losses:?}");
    let unet: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("unet/config.json")).unwrap()).unwrap();
    assert_eq!(unet["time_cond_proj_dim"], 16);
    std::fs::remove_dir_all(&dir).ok();
}

/// Writes `tensors` as a safetensors file.
fn save(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

#[test]
fn bad_files_are_refused_in_one_line_naming_the_file_and_tensor() {
    let dir = tmp("bad");
    let cache = dir.join("cache");
    let config = folder();
    let convert = |input: &Path| {
        let e = err(lcm(
            &cache,
            &[
                "convert",
                "--input",
                input.to_str().unwrap(),
                "--output",
                dir.join("out").to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
            ],
        ));
        assert_eq!(e.trim().lines().count(), 1, "{e}");
        assert!(
            e.contains(input.file_name().unwrap().to_str().unwrap()),
            "{e}"
        );
        e
    };
    let all = load(&file());
    let only = |keep: &dyn Fn(&str) -> bool, name: &str| {
        let t: HashMap<String, Tensor> = all
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let p = dir.join(name);
        save(&t, &p);
        p
    };

    // Truncated.
    let bytes = std::fs::read(file()).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = convert(&cut);
    assert!(e.contains("truncated"), "{e}");
    // A component missing.
    let e = convert(&only(
        &|k| !k.starts_with("first_stage_model."),
        "novae.safetensors",
    ));
    assert!(e.contains("VAE is missing") && e.contains("--vae"), "{e}");
    // A separate VAE file makes it whole again (the VAE in LDM names without its prefix).
    let vae_only: HashMap<String, Tensor> = all
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("first_stage_model.")?.to_string(), v.clone())))
        .collect();
    let vae_file = dir.join("vae.safetensors");
    save(&vae_only, &vae_file);
    ok(lcm(
        &cache,
        &[
            "convert",
            "--input",
            dir.join("novae.safetensors").to_str().unwrap(),
            "--vae",
            vae_file.to_str().unwrap(),
            "--output",
            dir.join("whole").to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
    ));
    // EMA copies and schedule buffers beside the model are left out, and said so; a bf16 file
    // converts with its dtype kept.
    let mut extra: HashMap<String, Tensor> = all
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(candle_core::DType::BF16).unwrap()))
        .collect();
    for k in [
        "model_ema.decay",
        "model_ema.diffusion_modelinput_blocks00weight",
        "alphas_cumprod",
    ] {
        extra.insert(
            k.into(),
            Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    }
    let p = dir.join("ema.safetensors");
    save(&extra, &p);
    let text = ok(lcm(
        &cache,
        &[
            "convert",
            "--input",
            p.to_str().unwrap(),
            "--output",
            dir.join("ema").to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
    ));
    assert!(text.contains("958 tensors (3 others"), "{text}");
    let unet = load(&dir.join("ema/unet/diffusion_pytorch_model.safetensors"));
    assert!(unet.values().all(|t| t.dtype() == candle_core::DType::BF16));
    // SDXL and SD 2.x, by their keys.
    let mut xl = all.clone();
    xl.insert(
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight".into(),
        Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let p = dir.join("xl.safetensors");
    save(&xl, &p);
    assert!(convert(&p).contains("SDXL"));
    let mut v2 = all.clone();
    v2.insert(
        "cond_stage_model.model.ln_final.weight".into(),
        Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let p = dir.join("v2.safetensors");
    save(&v2, &p);
    assert!(convert(&p).contains("2.x"));
    // A pickle, whatever its extension.
    let p = dir.join("model.ckpt");
    std::fs::write(&p, b"\x80\x02}q\x00.").unwrap();
    assert!(convert(&p).contains("arbitrary code"));
    let p = dir.join("disguised.safetensors");
    std::fs::write(&p, b"PK\x03\x04rest of a zip").unwrap();
    assert!(convert(&p).contains("arbitrary code"));
    // Shapes that contradict each other: one convolution of the wrong width.
    let key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight";
    let mut bad = all.clone();
    bad.insert(
        key.into(),
        Tensor::zeros((32, 16, 3, 3), candle_core::DType::F16, &Device::Cpu).unwrap(),
    );
    let p = dir.join("shapes.safetensors");
    save(&bad, &p);
    let e = convert(&p);
    assert!(e.contains(key), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
