//! Files written so that a crash never leaves a half-written one: every writer goes through a
//! temporary file in the same folder and a rename.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Tensor;

/// Refuse to replace anything at `path` but a regular file: the rename that makes writes atomic
/// would turn a device node (`/dev/null`), a FIFO or a symbolic link into a regular file, and a
/// directory cannot be replaced. A path that does not exist yet is fine.
pub fn check_output(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let t = meta.file_type();
    let kind = if t.is_file() {
        return Ok(());
    } else if t.is_symlink() {
        "a symbolic link (write to the path it points to)"
    } else if t.is_dir() {
        "a directory"
    } else {
        "a device, FIFO or socket"
    };
    anyhow::bail!(
        "refusing to write {}: it is {kind}, not a regular file",
        path.display()
    )
}

/// Write bytes to `path` through a temp file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    check_output(path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot move output into place at {}", path.display())
    })
}

/// safetensors written to a temporary name and renamed into place.
pub fn save_safetensors(weights: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    check_output(path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(weights, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Copy a folder's files (not subfolders) into `dst`, each written atomically.
pub fn copy_files(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    for e in std::fs::read_dir(src).with_context(|| format!("cannot read {}", src.display()))? {
        let p = e?.path();
        if p.is_file() {
            let bytes = std::fs::read(&p)?;
            write_atomic(&dst.join(p.file_name().context("file name")?), &bytes)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO, a symbolic link and a directory at the output path are refused and left as they
    /// were; a regular file is replaced.
    #[test]
    fn only_regular_files_are_replaced() -> Result<()> {
        use std::os::unix::fs::FileTypeExt;
        let dir = std::env::temp_dir().join(format!("lcm-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status()?;
        assert!(made.success());
        let target = dir.join("target.txt");
        std::fs::write(&target, b"keep")?;
        let link = dir.join("link.png");
        std::os::unix::fs::symlink(&target, &link)?;
        let sub = dir.join("sub");
        std::fs::create_dir_all(&sub)?;
        for (p, what) in [
            (&fifo, "FIFO"),
            (&link, "symbolic link"),
            (&sub, "directory"),
        ] {
            let e = write_atomic(p, b"x").unwrap_err().to_string();
            assert!(e.contains(what) && e.contains("refusing"), "{e}");
            let e = save_safetensors(&HashMap::new(), p)
                .unwrap_err()
                .to_string();
            assert!(e.contains("refusing"), "{e}");
        }
        assert!(std::fs::symlink_metadata(&fifo)?.file_type().is_fifo());
        assert!(std::fs::symlink_metadata(&link)?.file_type().is_symlink());
        assert_eq!(std::fs::read(&target)?, b"keep");
        write_atomic(&target, b"new")?;
        assert_eq!(std::fs::read(&target)?, b"new");
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    #[test]
    fn atomic_write_leaves_no_temp_file() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lcm-io-{}", std::process::id()));
        let p = dir.join("x.bin");
        write_atomic(&p, b"abc")?;
        assert_eq!(std::fs::read(&p)?, b"abc");
        let leftovers = std::fs::read_dir(&dir)?.count();
        assert_eq!(leftovers, 1);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
