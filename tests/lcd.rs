//! One latent-consistency-distillation step against the reference training script's numbers
//! (the `lcd_*` goldens: teacher = tiny-sd U-Net, online = target = tiny-lcm U-Net). Tolerances:
//! tensors atol 1e-4 + rtol 1e-5·max|ref|, losses rtol 1e-5, grids exact (fixture README).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use lcm::distill::lcd::{
    boundary_tensors, lcd_step, DdimSolver, LcdBatch, LcdConfig, LcdOutputs, Loss,
};
use lcm::model::config::{SchedulerConfig, UNetConfig};
use lcm::model::folder::weight_files;
use lcm::model::unet::UNet2DConditionModel;
use lcm::sample::schedule::NoiseSchedule;

fn usizes(name: &str) -> Vec<usize> {
    g(name)
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

fn check(name: &str, ours: &Tensor) {
    assert_close(name, ours, &g(name), 1e-4, 1e-5);
}

/// The student's guidance embedding against the reference's.
fn check_w_embedding(out: &LcdOutputs) {
    assert_close(
        "lcd_w_embedding",
        out.w_embedding.as_ref().unwrap(),
        &g("lcd_w_embedding"),
        1e-3,
        0.0,
    );
}

fn schedule() -> NoiseSchedule {
    let cfg =
        SchedulerConfig::load(&fixtures().join("tiny-sd/scheduler/scheduler_config.json")).unwrap();
    NoiseSchedule::from_config(&cfg).unwrap()
}

#[test]
fn solver_grid_and_boundary_scalings_match_the_script() {
    setup();
    let solver = DdimSolver::new(&schedule(), 50).unwrap();
    assert_eq!(solver.timesteps, usizes("lcd_ddim_timesteps"));
    let prev = Tensor::new(solver.alpha_cumprods_prev.as_slice(), &Device::Cpu).unwrap();
    assert_close(
        "lcd_ddim_alpha_cumprods_prev",
        &prev,
        &g("lcd_ddim_alpha_cumprods_prev"),
        1e-6,
        0.0,
    );
    let index = usizes("lcd_index");
    let (start, t_n) = solver.timesteps_for(&index);
    assert_eq!(start, usizes("lcd_start_timesteps"));
    assert_eq!(t_n, usizes("lcd_timesteps"));
    let like = g("lcd_z0");
    for (ts, s_name, o_name) in [
        (&start, "lcd_c_skip_start", "lcd_c_out_start"),
        (&t_n, "lcd_c_skip", "lcd_c_out"),
    ] {
        let (s, o) = boundary_tensors(ts, 10.0, &like).unwrap();
        assert_close(s_name, &s, &g(s_name), 0.0, 1e-6);
        assert_close(o_name, &o, &g(o_name), 0.0, 1e-6);
    }
}

#[test]
fn distillation_step_matches_the_reference_script() {
    setup();
    let schedule = schedule();
    let solver = DdimSolver::new(&schedule, 50).unwrap();
    let (teacher, student) = (fixture_unet("tiny-sd"), fixture_unet("tiny-lcm"));
    let index = usizes("lcd_index");
    let w: Vec<f64> = g("lcd_w")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let (z0, noise) = (g("lcd_z0"), g("lcd_noise"));
    let (prompt, uncond) = (g("lcd_prompt_embeds"), g("lcd_uncond_prompt_embeds"));
    let batch = LcdBatch {
        z0: &z0,
        noise: &noise,
        index: &index,
        w: &w,
        prompt_embeds: &prompt,
        uncond_embeds: &uncond,
    };
    let mut losses = vec![];
    for loss in [Loss::L2, Loss::Huber { c: 0.001 }] {
        let cfg = LcdConfig {
            timestep_scaling: 10.0,
            w_embed_dim: Some(32),
            loss,
            guidance_from: 0,
        };
        let out = lcd_step(
            &schedule, &solver, &student, &teacher, &student, &batch, &cfg,
        )
        .unwrap();
        check("lcd_noisy_model_input", &out.noisy_model_input);
        check_w_embedding(&out);
        check("lcd_online_noise_pred", &out.online_eps);
        check("lcd_model_pred", &out.model_pred);
        check("lcd_teacher_cond_output", &out.teacher_cond_eps);
        check("lcd_teacher_uncond_output", &out.teacher_uncond_eps);
        check("lcd_cfg_x0", &out.cfg_x0);
        check("lcd_cfg_eps", &out.cfg_eps);
        check("lcd_x_prev", &out.x_prev);
        check("lcd_target_noise_pred", &out.target_eps);
        check("lcd_target", &out.target);
        // At t_n = 0 (second sample) the boundary condition makes the target exactly x_prev.
        let d = max_abs_diff(&out.target.get(1).unwrap(), &out.x_prev.get(1).unwrap());
        assert_eq!(d, 0.0, "target at t = 0 must equal x_prev");
        losses.push(out.loss.to_scalar::<f32>().unwrap() as f64);
    }
    for (ours, name) in losses.iter().zip(["lcd_loss_l2", "lcd_loss_huber"]) {
        let reference = g(name).to_scalar::<f32>().unwrap() as f64;
        assert!(
            ((ours - reference) / reference).abs() < 1e-5,
            "{name}: {ours} vs {reference}"
        );
    }

    // A guidance interval between the two samples' start timesteps: the later sample keeps the
    // reference's guided teacher step, the earlier one gets the teacher's conditional ε alone,
    // and the student is still told each sample's w.
    let (start, _) = solver.timesteps_for(&index);
    assert!(start[1] < start[0], "{start:?}");
    let cfg = LcdConfig {
        timestep_scaling: 10.0,
        w_embed_dim: Some(32),
        loss: Loss::Huber { c: 0.001 },
        guidance_from: start[1] + 1,
    };
    let out = lcd_step(
        &schedule, &solver, &student, &teacher, &student, &batch, &cfg,
    )
    .unwrap();
    let row = |t: &Tensor, i: usize| t.narrow(0, i, 1).unwrap();
    assert_close(
        "lcd_cfg_eps (guided sample)",
        &row(&out.cfg_eps, 0),
        &row(&g("lcd_cfg_eps"), 0),
        1e-4,
        1e-5,
    );
    let d = max_abs_diff(&row(&out.cfg_eps, 1), &row(&out.teacher_cond_eps, 1));
    assert_eq!(
        d, 0.0,
        "below the interval the teacher step must be unguided"
    );
    assert!(max_abs_diff(&row(&out.cfg_eps, 1), &row(&g("lcd_cfg_eps"), 1)) > 1e-3);
    check_w_embedding(&out);
}

#[test]
fn every_student_weight_receives_a_gradient_from_the_lcd_loss() {
    // candle silently drops gradients through some fused ops; the student must be trainable end
    // to end, so build it from a VarMap holding the tiny-lcm weights and check every variable.
    setup();
    let dev = Device::Cpu;
    let dir = fixtures().join("tiny-lcm/unet");
    let cfg = UNetConfig::load(&dir.join("config.json")).unwrap();
    let varmap = candle_nn::VarMap::new();
    let student = UNet2DConditionModel::new(
        &cfg,
        candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )
    .unwrap();
    let weights =
        candle_core::safetensors::load(weight_files(&dir).unwrap()[0].clone(), &dev).unwrap();
    let vars = varmap.data().lock().unwrap().clone();
    assert_eq!(
        vars.len(),
        weights.len(),
        "the student has a different set of tensors than the checkpoint"
    );
    for (name, var) in &vars {
        var.set(&weights[name].to_dtype(DType::F32).unwrap())
            .unwrap();
    }
    let teacher = fixture_unet("tiny-sd");
    let schedule = schedule();
    let solver = DdimSolver::new(&schedule, 50).unwrap();
    let index = usizes("lcd_index");
    let w = [5.0, 13.0];
    let (z0, noise) = (g("lcd_z0"), g("lcd_noise"));
    let (prompt, uncond) = (g("lcd_prompt_embeds"), g("lcd_uncond_prompt_embeds"));
    let batch = LcdBatch {
        z0: &z0,
        noise: &noise,
        index: &index,
        w: &w,
        prompt_embeds: &prompt,
        uncond_embeds: &uncond,
    };
    let cfg = LcdConfig {
        timestep_scaling: 10.0,
        w_embed_dim: Some(32),
        loss: Loss::Huber { c: 0.001 },
        guidance_from: 0,
    };
    let out = lcd_step(
        &schedule,
        &solver,
        &student,
        &teacher,
        &teacher_as_target(&student),
        &batch,
        &cfg,
    )
    .unwrap();
    // The frozen-weights path must match the VarMap path numerically.
    check("lcd_online_noise_pred", &out.online_eps);
    let grads = out.loss.backward().unwrap();
    let mut missing = vec![];
    for (name, var) in &vars {
        let nonzero = grads
            .get(var.as_tensor())
            .map(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            })
            .unwrap_or(false);
        if !nonzero {
            missing.push(name.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} variables get no gradient: {:?}",
        missing.len(),
        vars.len(),
        &missing[..missing.len().min(10)]
    );
}

/// The target network sees the student's weights but never contributes gradients.
fn teacher_as_target(student: &UNet2DConditionModel) -> Detached<'_> {
    Detached(student)
}

struct Detached<'a>(&'a UNet2DConditionModel);

impl lcm::sample::denoiser::Denoiser for Detached<'_> {
    fn predict_eps(
        &self,
        x: &Tensor,
        t: &[usize],
        cond: &Tensor,
        w: Option<&Tensor>,
    ) -> anyhow::Result<Tensor> {
        Ok(self.0.predict_eps(x, t, cond, w)?.detach())
    }
}
