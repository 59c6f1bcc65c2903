//! What distillation needs to know about the student network, as a trait, so that one trainer
//! distils any ε-predicting network: how to build it over a set of weights, and which of its
//! tensors the teacher lacks (the guidance embedding, initialised fresh).

use anyhow::Result;
use candle_core::DType;
use candle_nn::VarBuilder;

use crate::model::config::UNetConfig;
use crate::model::unet::UNet2DConditionModel;
use crate::sample::denoiser::Denoiser;

pub trait Student {
    /// The student network over `vb` (live variables for the online student, detached tensors
    /// for the target).
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Denoiser>>;

    /// Whether the student's tensor `name` is new to it (absent from the teacher): drawn as
    /// PyTorch's `nn.Linear` default init, U(−1/√fan_in, 1/√fan_in), rather than copied.
    fn is_fresh(&self, name: &str) -> bool;

    /// The student's config, as its exported folder will state it (part of the run's settings).
    fn config_json(&self) -> serde_json::Value;
}

/// The image U-Net as a student: the teacher's config, plus a guidance embedding
/// (`time_cond_proj_dim`) unless it is an LCM-LoRA student.
pub struct UNetStudent {
    pub config: UNetConfig,
}

impl UNetStudent {
    /// `teacher`'s layout with a `w_embed_dim`-wide guidance embedding (`None`: without one, as
    /// LCM-LoRA students are).
    pub fn new(teacher: &UNetConfig, w_embed_dim: Option<usize>) -> Self {
        let mut config = teacher.clone();
        if w_embed_dim.is_some() {
            config.time_cond_proj_dim = w_embed_dim;
        }
        Self { config }
    }
}

impl Student for UNetStudent {
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Denoiser>> {
        let vb = vb.set_dtype(DType::F32);
        Ok(Box::new(UNet2DConditionModel::new(&self.config, vb)?))
    }

    fn is_fresh(&self, name: &str) -> bool {
        name.contains("cond_proj")
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap_or_default()
    }
}

/// The motion denoiser as a student: the teacher's config plus a guidance embedding.
pub struct MotionStudent {
    pub config: crate::model::motion_denoiser::MotionDenoiserConfig,
}

impl MotionStudent {
    pub fn new(
        teacher: &crate::model::motion_denoiser::MotionDenoiserConfig,
        w_embed_dim: usize,
    ) -> Self {
        let mut config = teacher.clone();
        config.time_cond_proj_dim = Some(w_embed_dim);
        Self { config }
    }
}

impl Student for MotionStudent {
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Denoiser>> {
        Ok(Box::new(
            crate::model::motion_denoiser::MotionDenoiser::new(
                &self.config,
                vb.set_dtype(DType::F32),
            )?,
        ))
    }

    fn is_fresh(&self, name: &str) -> bool {
        name.contains("cond_proj")
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap_or_default()
    }
}
