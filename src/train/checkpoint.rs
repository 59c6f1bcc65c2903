//! Training checkpoints: a folder `checkpoint-<step>` holding one safetensors file per tensor group
//! (student, target, optimizer, …) and `state.json` (step, resolved config, anything else the
//! trainer needs). The folder is written under a temporary name and renamed into place, so a
//! checkpoint either exists completely or not at all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

pub const STATE_FILE: &str = "state.json";

pub fn folder_name(step: u64) -> String {
    format!("checkpoint-{step:08}")
}

/// Write a checkpoint for `step` under `run_dir`; returns its folder.
pub fn save(
    run_dir: &Path,
    step: u64,
    groups: &[(&str, &HashMap<String, Tensor>)],
    state: &serde_json::Value,
) -> Result<PathBuf> {
    let final_dir = run_dir.join(folder_name(step));
    let tmp = run_dir.join(format!(".{}.tmp{}", folder_name(step), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    for (name, tensors) in groups {
        let path = tmp.join(format!("{name}.safetensors"));
        candle_core::safetensors::save(tensors, &path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let mut state = state.clone();
    state["step"] = step.into();
    std::fs::write(tmp.join(STATE_FILE), serde_json::to_vec_pretty(&state)?)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| {
        format!(
            "cannot move checkpoint into place at {}",
            final_dir.display()
        )
    })?;
    remove_stale(run_dir)?;
    Ok(final_dir)
}

/// Remove half-written checkpoints (`.checkpoint-*.tmp<pid>`) that a killed run left behind.
fn remove_stale(run_dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(run_dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with(".checkpoint-") && name.contains(".tmp") && path.is_dir() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// Keep the `keep` complete checkpoints with the highest steps under `run_dir`, remove the rest.
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    let mut found = complete(run_dir)?;
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (_, path) in found.into_iter().skip(keep.max(1)) {
        std::fs::remove_dir_all(&path)
            .with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(())
}

/// The complete checkpoints (with their state file) under `run_dir`, as (step, folder).
fn complete(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    if !run_dir.is_dir() {
        return Ok(found);
    }
    for entry in std::fs::read_dir(run_dir)? {
        let path = entry?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(step) = step {
            if path.join(STATE_FILE).is_file() {
                found.push((step, path));
            }
        }
    }
    Ok(found)
}

/// The complete checkpoint with the highest step under `run_dir`, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(complete(run_dir)?
        .into_iter()
        .max_by_key(|(step, _)| *step)
        .map(|(_, p)| p))
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub step: u64,
    pub state: serde_json::Value,
    pub dir: PathBuf,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let state: serde_json::Value = crate::model::config::read_json(&dir.join(STATE_FILE))?;
        let step = state["step"]
            .as_u64()
            .with_context(|| format!("{} has no step", dir.join(STATE_FILE).display()))?;
        Ok(Self {
            step,
            state,
            dir: dir.to_path_buf(),
        })
    }

    /// One tensor group (e.g. "student").
    pub fn group(&self, name: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
        let path = self.dir.join(format!("{name}.safetensors"));
        if !path.is_file() {
            bail!(
                "checkpoint {} has no {name}.safetensors",
                self.dir.display()
            )
        }
        candle_core::safetensors::load(&path, device)
            .with_context(|| format!("cannot read {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporaries_go_and_only_the_newest_are_kept() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lcm-ckpt-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // What a run killed mid-checkpoint leaves.
        std::fs::create_dir_all(dir.join(".checkpoint-00000003.tmp4242"))?;
        let t = HashMap::from([("w".to_string(), Tensor::new(&[1f32], &Device::Cpu)?)]);
        for step in [1, 2, 4, 5] {
            save(&dir, step, &[("m", &t)], &serde_json::json!({}))?;
        }
        assert!(!dir.join(".checkpoint-00000003.tmp4242").exists());
        prune(&dir, 2)?;
        let mut left: Vec<String> = std::fs::read_dir(&dir)?
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["checkpoint-00000004", "checkpoint-00000005"]);
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    #[test]
    fn save_then_latest_then_load() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lcm-ckpt-{}", std::process::id()));
        let t = HashMap::from([("w".to_string(), Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?)]);
        save(
            &dir,
            5,
            &[("student", &t)],
            &serde_json::json!({"lr": 1e-4}),
        )?;
        save(
            &dir,
            12,
            &[("student", &t)],
            &serde_json::json!({"lr": 1e-4}),
        )?;
        // An unfinished checkpoint (no state.json) is ignored.
        std::fs::create_dir_all(dir.join("checkpoint-00000099"))?;
        let latest = latest(&dir)?.expect("a checkpoint");
        let ck = Checkpoint::open(&latest)?;
        assert_eq!(ck.step, 12);
        assert_eq!(ck.state["lr"], 1e-4);
        assert_eq!(
            ck.group("student", &Device::Cpu)?["w"].to_vec1::<f32>()?,
            vec![1., 2., 3.]
        );
        assert!(ck.group("target", &Device::Cpu).is_err());
        let leftovers = std::fs::read_dir(&dir)?
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count();
        assert_eq!(leftovers, 0, "temporary folders left behind");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
