//! What distillation needs to know about the student network, as a trait, so that one trainer
//! distils any ε-predicting network: how to build it over a set of weights, and which of its
//! tensors the teacher lacks (the guidance embedding, initialised fresh; a flow-map student's
//! end-time embedding, zero so it starts as the teacher).

use anyhow::Result;
use candle_core::DType;
use candle_nn::VarBuilder;

use crate::model::config::UNetConfig;
use crate::model::unet::UNet2DConditionModel;
use crate::sample::denoiser::Denoiser;

/// How a student tensor the teacher lacks starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fresh {
    /// PyTorch's `nn.Linear` default, U(−1/√fan_in, 1/√fan_in) (the guidance embedding, as the
    /// reference script).
    Linear,
    /// Zero, so the student starts as the network it is copied from (the end-time embedding).
    Zero,
}

/// The fresh tensors of the students here: the guidance and end-time embeddings.
fn fresh_embedding(name: &str) -> Option<Fresh> {
    if name.contains("cond_proj") {
        Some(Fresh::Linear)
    } else if name.contains("end_proj") {
        Some(Fresh::Zero)
    } else {
        None
    }
}

pub trait Student {
    /// The student network over `vb` (live variables for the online student, detached tensors
    /// for the target).
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Denoiser>>;

    /// How the student's tensor `name` starts if it is new to it (absent from the teacher);
    /// `None`: it must come from the teacher. By default the guidance and end-time embeddings.
    fn fresh(&self, name: &str) -> Option<Fresh> {
        fresh_embedding(name)
    }

    /// The student's config, as its exported folder will state it (part of the run's settings).
    fn config_json(&self) -> serde_json::Value;
}

/// The image U-Net as a student: the teacher's config, plus a guidance embedding
/// (`time_cond_proj_dim`) unless it is an LCM-LoRA student, plus an end-time embedding for a
/// flow-map student.
pub struct UNetStudent {
    pub config: UNetConfig,
}

impl UNetStudent {
    /// `teacher`'s layout with a `w_embed_dim`-wide guidance embedding (`None`: without one, as
    /// LCM-LoRA students are), and an end-time embedding if `flow_map`.
    pub fn new(teacher: &UNetConfig, w_embed_dim: Option<usize>, flow_map: bool) -> Self {
        let mut config = teacher.clone();
        if w_embed_dim.is_some() {
            config.time_cond_proj_dim = w_embed_dim;
        }
        config.end_time_embedding |= flow_map;
        Self { config }
    }
}

impl Student for UNetStudent {
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Denoiser>> {
        let vb = vb.set_dtype(DType::F32);
        Ok(Box::new(UNet2DConditionModel::new(&self.config, vb)?))
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap_or_default()
    }
}

/// The motion denoiser as a student: the teacher's config plus a guidance embedding, and an
/// end-time embedding for a flow-map student.
pub struct MotionStudent {
    pub config: crate::model::motion_denoiser::MotionDenoiserConfig,
}

impl MotionStudent {
    pub fn new(
        teacher: &crate::model::motion_denoiser::MotionDenoiserConfig,
        w_embed_dim: usize,
        flow_map: bool,
    ) -> Self {
        let mut config = teacher.clone();
        config.time_cond_proj_dim = Some(w_embed_dim);
        config.end_time_embedding |= flow_map;
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

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap_or_default()
    }
}
