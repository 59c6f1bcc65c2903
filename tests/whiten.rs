//! `lcm whiten`: the whitening maths, and the folded VAE and rewired U-Net against the originals
//! on the tiny diffusers fixture (exact relations, so tight tolerances).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use lcm::tools::whiten::{channel_covariance, symmetric_eigen, zca, Mat};

fn matmul(a: &Mat, b: &Mat) -> Mat {
    let n = a.len();
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| (0..n).map(|k| a[i][k] * b[k][j]).sum())
                .collect()
        })
        .collect()
}

fn transpose(a: &Mat) -> Mat {
    let n = a.len();
    (0..n).map(|i| (0..n).map(|j| a[j][i]).collect()).collect()
}

fn max_dev_from_identity(a: &Mat, scale: f64) -> f64 {
    let mut worst = 0.0f64;
    for (i, row) in a.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let want = if i == j { scale } else { 0.0 };
            worst = worst.max((v - want).abs());
        }
    }
    worst
}

/// A correlated covariance with one weak direction, like the tiny VAE's latents.
fn covariance() -> Mat {
    vec![
        vec![1.47, 0.77, -0.21, 0.20],
        vec![0.77, 0.55, -0.35, -0.30],
        vec![-0.21, -0.35, 0.52, 0.76],
        vec![0.20, -0.30, 0.76, 1.32],
    ]
}

#[test]
fn eigen_and_zca_whiten_a_covariance() {
    let c = covariance();
    let (lambda, v) = symmetric_eigen(&c);
    // V·Λ·Vᵀ gives C back and V is orthonormal.
    let vl: Mat = v
        .iter()
        .map(|r| r.iter().zip(&lambda).map(|(x, l)| x * l).collect())
        .collect();
    let back = matmul(&vl, &transpose(&v));
    for (r, b) in c.iter().zip(&back) {
        for (x, y) in r.iter().zip(b) {
            assert!((x - y).abs() < 1e-10, "V·Λ·Vᵀ ≠ C: {x} vs {y}");
        }
    }
    assert!(max_dev_from_identity(&matmul(&transpose(&v), &v), 1.0) < 1e-10);

    let (w, w_inv) = zca(&c, 0.0).unwrap();
    let white = matmul(&matmul(&w, &c), &transpose(&w));
    assert!(max_dev_from_identity(&white, 1.0) < 1e-9, "{white:?}");
    assert!(max_dev_from_identity(&matmul(&w, &w_inv), 1.0) < 1e-9);
    let asym = max_dev_from_identity(&matmul(&w, &transpose(&w_inv)), 1.0);
    assert!(asym < 1e-9, "ZCA is symmetric: W·W⁻ᵀ = I");

    // With a ridge the weak direction is lifted less, the total variance stays 4.
    let (wr, wr_inv) = zca(&c, 0.1).unwrap();
    let ridged = matmul(&matmul(&wr, &c), &transpose(&wr));
    let trace: f64 = (0..4).map(|i| ridged[i][i]).sum();
    assert!((trace - 4.0).abs() < 1e-9, "trace {trace}");
    assert!(max_dev_from_identity(&matmul(&wr, &wr_inv), 1.0) < 1e-9);
    let (l, vecs) = symmetric_eigen(&c);
    let weakest = (0..4)
        .min_by(|&a, &b| l[a].partial_cmp(&l[b]).unwrap())
        .unwrap();
    let dir: Vec<f64> = (0..4).map(|i| vecs[i][weakest]).collect();
    let gain = |m: &Mat| -> f64 {
        (0..4)
            .map(|i| (0..4).map(|j| m[i][j] * dir[j]).sum::<f64>().powi(2))
            .sum::<f64>()
            .sqrt()
    };
    assert!(
        gain(&wr) < gain(&w),
        "the ridge must lift the weakest direction less"
    );
    assert!(gain(&wr) > 1.0, "but still lift it");

    // A channel that carries nothing cannot be whitened.
    let mut singular = c.clone();
    singular[3] = vec![0.0; 4];
    for row in singular.iter_mut() {
        row[3] = 0.0;
    }
    let err = zca(&singular, 0.0).unwrap_err().to_string();
    assert!(err.contains("singular"), "{err}");
}

/// The posterior's log-variance goes through a 1×1 convolution too, which can only be exact when
/// the old variances are equal: then channel i of M·z has variance Σ_j M²_ij·σ².
#[test]
fn folded_log_variance_is_exact_for_equal_variances() {
    let dev = Device::Cpu;
    let l = 4;
    let c = -3.0f32; // every old log-variance
    let mean_rows = Tensor::randn(0f32, 1.0, (l, 2 * l), &dev).unwrap();
    let logvar_rows = Tensor::zeros((l, 2 * l), DType::F32, &dev).unwrap();
    let qw = Tensor::cat(&[mean_rows, logvar_rows], 0)
        .unwrap()
        .reshape((2 * l, 2 * l, 1, 1))
        .unwrap();
    let qb = Tensor::cat(
        &[
            Tensor::zeros(l, DType::F32, &dev).unwrap(),
            Tensor::full(c, l, &dev).unwrap(),
        ],
        0,
    )
    .unwrap();
    let weights = std::collections::HashMap::from([
        ("quant_conv.weight".to_string(), qw),
        ("quant_conv.bias".to_string(), qb),
        (
            "post_quant_conv.weight".to_string(),
            Tensor::randn(0f32, 1.0, (l, l, 1, 1), &dev).unwrap(),
        ),
        (
            "post_quant_conv.bias".to_string(),
            Tensor::zeros(l, DType::F32, &dev).unwrap(),
        ),
    ]);
    let (w, w_inv) = zca(&covariance(), 0.0).unwrap();
    let s = 0.35;
    let folded = lcm::tools::whiten::fold_into_vae(&weights, &w, &w_inv, s, 0.0).unwrap();
    let bias = folded["quant_conv.bias"].to_vec1::<f32>().unwrap();
    let lv_w = max_abs(&folded["quant_conv.weight"].narrow(0, l, l).unwrap());
    assert_eq!(lv_w, 0.0, "the log-variance rows read no features");
    for (i, row) in w.iter().enumerate() {
        let exact = c as f64 + row.iter().map(|m| (s * m).powi(2)).sum::<f64>().ln();
        assert!(
            (bias[l + i] as f64 - exact).abs() < 1e-5,
            "channel {i}: {} vs {exact}",
            bias[l + i]
        );
    }
}

/// A VAE folder in f32 on the CPU (the library's loader for frozen VAEs, 32² images).
fn load_vae(dir: &std::path::Path) -> lcm::model::vae::AutoencoderKL {
    lcm::train::start::frozen_vae(dir, 32, &Device::Cpu)
        .unwrap()
        .0
}

/// z' = W·z over channels.
fn mix(w: &Mat, z: &Tensor) -> Tensor {
    let flat: Vec<f32> = w.iter().flatten().map(|&v| v as f32).collect();
    let m = Tensor::from_vec(flat, (4, 4), z.device()).unwrap();
    z.permute((0, 2, 3, 1))
        .unwrap()
        .contiguous()
        .unwrap()
        .broadcast_matmul(&m.t().unwrap())
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap()
}

#[test]
fn whiten_cli_folds_into_the_vae_and_rewires_the_unet() {
    setup();
    let root = std::env::temp_dir().join(format!("lcm-whiten-{}", std::process::id()));
    let data = root.join("shapes");
    let d = data.to_str().unwrap();
    let out = lcm_bin(&[
        "data", "shapes", "--out", d, "--count", "16", "--size", "32", "--seed", "4",
    ]);
    assert!(out.status.success());
    let vae_dir = fixtures().join("tiny-sd/vae");
    let unet_dir = fixtures().join("tiny-sd/unet");
    let (new_vae, new_unet) = (root.join("vae"), root.join("unet"));
    let whiten = |ridge: &str, extra: &[&str]| {
        let ridge = format!("--ridge={ridge}");
        let mut args = vec![
            "whiten",
            "--vae",
            vae_dir.to_str().unwrap(),
            "--data",
            d,
            "--samples",
            "16",
            "--resolution",
            "32",
            &ridge,
            "--output",
            new_vae.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        lcm_bin(&args)
    };
    let out = whiten(
        "0",
        &[
            "--unet",
            unet_dir.to_str().unwrap(),
            "--unet-output",
            new_unet.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same images the command measured.
    let examples = lcm::data::scan(&data).unwrap();
    let (loaded, _) = lcm::data::load_all(&examples, 32, &Device::Cpu);
    let images = Tensor::stack(
        &loaded.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(),
        0,
    )
    .unwrap();
    let (old, new) = (load_vae(&vae_dir), load_vae(&new_vae));
    assert_eq!(new.config.scaling_factor, 1.0);
    assert_eq!(new.config.shift_factor, None);
    let z_old = lcm::tools::whiten::encode_scaled(&old, &images).unwrap();
    let z_new = lcm::tools::whiten::encode_scaled(&new, &images).unwrap();
    let (w, w_inv) = zca(&channel_covariance(&z_old).unwrap(), 0.0).unwrap();

    // The encoder's mean comes out as W·(scaled old mean); its covariance is the identity.
    let expect = mix(&w, &z_old);
    let tol = 2e-5 * max_abs(&expect).max(1.0);
    assert!(max_abs_diff(&z_new, &expect) < tol, "z' ≠ W·z");
    let cov = channel_covariance(&z_new).unwrap();
    assert!(max_dev_from_identity(&cov, 1.0) < 1e-5, "{cov:?}");
    // The decoder turns the new latents into the old images.
    let img_old = old.decode(&old.unscale(&z_old).unwrap()).unwrap();
    let img_new = new.decode(&new.unscale(&z_new).unwrap()).unwrap();
    assert!(
        max_abs_diff(&img_old, &img_new) < 1e-4,
        "decoded images differ"
    );

    // The rewired U-Net on W·z predicts W·(the old U-Net's ε on z).
    let (u_old, u_new) = (load_unet(&unet_dir), load_unet(&new_unet));
    let z = z_old.narrow(0, 0, 2).unwrap();
    let zw = mix(&w, &z);
    let t = Tensor::new(&[500f32, 20.0], &Device::Cpu).unwrap();
    let hidden = u_old.config.cross_attention_dim;
    let ctx = Tensor::randn(0f32, 1.0, (2, 7, hidden), &Device::Cpu).unwrap();
    let e_old = u_old.forward(&z, &t, &ctx, None).unwrap();
    let e_new = u_new.forward(&zw, &t, &ctx, None).unwrap();
    let want = mix(&w, &e_old);
    assert!(
        max_abs_diff(&e_new, &want) < 1e-4 * max_abs(&want).max(1.0),
        "U-Net(W·z) ≠ W·U-Net(z)"
    );
    assert!(max_abs_diff(&mix(&w_inv, &zw), &z) < 1e-4);

    // Refusals, each naming its flag or tensor.
    let err = String::from_utf8_lossy(&whiten("-1", &[]).stderr).to_string();
    assert!(err.contains("--ridge"), "{err}");
    let no_quant = root.join("vae-no-quant");
    std::fs::create_dir_all(&no_quant).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vae_dir.join("config.json")).unwrap())
            .unwrap();
    cfg["use_quant_conv"] = false.into();
    std::fs::write(no_quant.join("config.json"), cfg.to_string()).unwrap();
    for f in lcm::model::folder::weight_files(&vae_dir).unwrap() {
        std::fs::copy(&f, no_quant.join(f.file_name().unwrap())).unwrap();
    }
    let out = lcm_bin(&[
        "whiten",
        "--vae",
        no_quant.to_str().unwrap(),
        "--data",
        d,
        "--resolution",
        "32",
        "--output",
        root.join("x").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("quant_conv"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}
