//! Training: one state ([`state`]: variables, AdamW with its schedule, clipping, accumulation,
//! EMA, checkpoints, resume) and one loop ([`run`]: a [`run::Task`] says how a batch becomes a
//! loss, what a sample shows and what the export writes), the flags they share ([`args`]), where
//! a run's weights start ([`start`]), and the stages that train the project's own model from
//! scratch: the [`vae`], the text encoder ([`text_encoder`]) and the [`teacher`] for images, the
//! [`motion_vae`] and the [`motion_teacher`] for motion. The evaluator's
//! trainer is `crate::eval::train`; distillation is `crate::distill`.

pub mod args;
pub mod checkpoint;
pub mod motion_teacher;
pub mod motion_vae;
pub mod optim;
pub mod run;
pub mod start;
pub mod state;
pub mod teacher;
pub mod text_encoder;
pub mod vae;

/// Tests: the tiny model's text-encoder config and tokenizer (`configs/tiny`).
#[cfg(test)]
pub(crate) fn tiny_text_config() -> anyhow::Result<(
    crate::model::config::ClipTextConfig,
    crate::model::tokenizer::ClipTokenizer,
)> {
    let root = crate::pipeline::source::repo_root().join("configs/tiny");
    let cfg = crate::model::config::ClipTextConfig::load(&root.join("text_encoder/config.json"))?;
    let tok = crate::model::tokenizer::ClipTokenizer::from_dir(
        &root.join("tokenizer"),
        cfg.max_position_embeddings,
    )?;
    Ok((cfg, tok))
}

/// Tests: the U-Net config of `configs/NAME`.
#[cfg(test)]
pub(crate) fn unet_config(name: &str) -> anyhow::Result<crate::model::config::UNetConfig> {
    let root = crate::pipeline::source::repo_root()
        .join("configs")
        .join(name);
    crate::model::config::UNetConfig::load(&root.join("unet/config.json"))
}
