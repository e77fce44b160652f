//! Durable writes: temp file in the same folder, fsync, rename, fsync the folder, so a power cut
//! leaves either the old file or the new one, never a truncated one.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// The exclusive hold of one run on its output folder: an advisory lock (flock) on `DIR/.lock`,
/// which holds the owner's pid. The lock goes with the process, so a crashed run leaves none.
pub struct OutLock {
    _file: std::fs::File,
}

impl OutLock {
    /// Takes the folder (created if missing) or fails at once naming the pid holding it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        use std::io::{Read, Seek};
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        // SAFETY: flock on a descriptor this function owns for the lock's lifetime.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            return Err(Error::Locked {
                path: dir.to_path_buf(),
                pid: pid.trim().to_string(),
            });
        }
        file.set_len(0).map_err(|e| Error::io(&path, e))?;
        file.rewind().map_err(|e| Error::io(&path, e))?;
        write!(file, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
        Ok(Self { _file: file })
    }
}

/// Removes the temp files an interrupted [`write_atomic`] left in `dir`; how many.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with('.') && n.ends_with(".tmp")
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Numbered checkpoints `step-XXXXXXXX.safetensors` in one folder, the newest `keep` kept.
/// Each is a single file written atomically, so a checkpoint is either whole or absent.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    pub dir: std::path::PathBuf,
    pub keep: usize,
}

/// A loaded checkpoint: its step, tensors and string metadata.
pub struct Checkpoint {
    pub step: u64,
    pub path: std::path::PathBuf,
    pub tensors: crate::model::TensorMap,
    pub meta: std::collections::HashMap<String, String>,
}

impl CheckpointDir {
    pub fn new(dir: impl Into<std::path::PathBuf>, keep: usize) -> Self {
        Self {
            dir: dir.into(),
            keep: keep.max(1),
        }
    }

    fn list(&self) -> Vec<(u64, std::path::PathBuf)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v: Vec<(u64, std::path::PathBuf)> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let step = name
                    .strip_prefix("step-")?
                    .strip_suffix(".safetensors")?
                    .parse()
                    .ok()?;
                Some((step, e.path()))
            })
            .collect();
        v.sort();
        v
    }

    pub fn save(
        &self,
        step: u64,
        tensors: &crate::model::TensorMap,
        mut meta: std::collections::HashMap<String, String>,
    ) -> Result<std::path::PathBuf> {
        meta.insert("step".into(), step.to_string());
        let bytes = crate::model::weights::safetensors_bytes(tensors, Some(meta))?;
        let path = self.dir.join(format!("step-{step:08}.safetensors"));
        write_atomic(&path, &bytes)?;
        let all = self.list();
        for (_, old) in all.iter().take(all.len().saturating_sub(self.keep)) {
            if let Err(e) = std::fs::remove_file(old) {
                log::warn!("{}: could not remove old checkpoint: {e}", old.display());
            }
        }
        Ok(path)
    }

    /// The newest checkpoint that loads; a damaged one is reported and the one before it tried.
    pub fn latest(&self, device: &candle_core::Device) -> Option<Checkpoint> {
        self.latest_at_or_before(u64::MAX, device)
    }

    /// The newest checkpoint saved at or before `step` that loads (the oldest one that loads
    /// when none is that old): where a rollback goes, far enough back that the drift which set
    /// the guard off had not begun.
    pub fn latest_at_or_before(
        &self,
        step: u64,
        device: &candle_core::Device,
    ) -> Option<Checkpoint> {
        let all = self.list();
        let old = all.iter().filter(|(s, _)| *s <= step).count();
        let order = all[..old].iter().rev().chain(all[old..].iter());
        for (step, path) in order.cloned() {
            match load_checkpoint(&path, device) {
                Ok((tensors, meta)) => {
                    return Some(Checkpoint {
                        step,
                        path,
                        tensors,
                        meta,
                    })
                }
                Err(e) => log::error!("{e}; trying an older checkpoint"),
            }
        }
        None
    }
}

pub fn load_checkpoint(
    path: &Path,
    device: &candle_core::Device,
) -> Result<(
    crate::model::TensorMap,
    std::collections::HashMap<String, String>,
)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let ck = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| ck(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors: crate::model::TensorMap = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| ck(e.to_string()))?
        .into_iter()
        .collect();
    // A checkpoint with non-finite values is damaged like a truncated one.
    crate::model::weights::check_finite(path, &tensors).map_err(|e| ck(e.to_string()))?;
    Ok((tensors, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn one_run_per_folder_and_stale_temps_go() {
        let tmp = std::env::temp_dir().join(format!("segadapt-lock-{}", std::process::id()));
        let held = OutLock::acquire(&tmp).unwrap();
        let err = OutLock::acquire(&tmp).err().unwrap().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(held);
        let again = OutLock::acquire(&tmp);
        assert!(again.is_ok(), "released with its holder");
        std::fs::write(tmp.join(".step-00000005.safetensors.4242.tmp"), b"partial").unwrap();
        std::fs::write(tmp.join("step-00000005.safetensors"), b"kept").unwrap();
        assert_eq!(remove_stale_temps(&tmp), 1);
        assert!(tmp.join("step-00000005.safetensors").exists());
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn a_rollback_target_is_the_newest_checkpoint_old_enough() {
        let tmp = std::env::temp_dir().join(format!("segadapt-ck-{}", std::process::id()));
        let dir = CheckpointDir::new(&tmp, 3);
        for step in [0u64, 100, 200, 300] {
            let mut m = crate::model::TensorMap::new();
            m.insert("w".into(), Tensor::new(step as f32, &Device::Cpu).unwrap());
            dir.save(step, &m, Default::default()).unwrap();
        }
        let at = |s: u64| dir.latest_at_or_before(s, &Device::Cpu).unwrap().step;
        assert_eq!(at(u64::MAX), 300);
        // Flagged at step 315 with a 20-step margin: 300 may already hold the drift.
        assert_eq!(at(295), 200);
        assert_eq!(at(200), 200);
        // Nothing kept is that old (0 was pruned): the oldest kept.
        assert_eq!(at(50), 100);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
