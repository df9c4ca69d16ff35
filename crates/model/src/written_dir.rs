//! Directories written whole — a model export, a PEFT adapter — so that a crash leaves the
//! previous one (or nothing), never a mix of old and new files: the new directory is built
//! beside its destination and renamed into place. Only a directory holding nothing but what
//! such a write puts there is ever replaced; one holding anything else is refused, left as it
//! was.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A kind of directory written whole: what it is called in messages, and which entries it
/// may hold.
pub struct DirKind {
    /// "a model export", "an adapter".
    pub what: &'static str,
    /// Whether `name`, an entry of the directory, is one such a write makes.
    pub holds: fn(&str) -> bool,
}

/// An error unless `out` is absent, empty, or holds only entries `kind` writes.
pub fn check_replaceable(out: &Path, kind: &DirKind) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("{} exists and is not a directory", out.display());
    }
    let entries =
        std::fs::read_dir(out).with_context(|| format!("cannot read {}", out.display()))?;
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !(kind.holds)(&name) {
            bail!(
                "{} already holds '{name}', which {} does not write: it is replaced whole, so \
                 give it a new or empty directory, or move '{name}' out",
                out.display(),
                kind.what
            );
        }
    }
    Ok(())
}

/// Writes the directory `out` whole: `fill` writes into a fresh staging directory beside it,
/// which then replaces `out` (checked first with [`check_replaceable`]). On an error the
/// staging directory is removed and `out` is left as it was.
pub fn write_dir<T>(
    out: &Path,
    kind: &DirKind,
    fill: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    // A link to the directory (onto a larger disk, say) stays a link: its target is replaced.
    let target;
    let out = match out.is_symlink() {
        true => {
            let to = std::fs::read_link(out)
                .with_context(|| format!("cannot read the link {}", out.display()))?;
            target = match out.parent() {
                Some(parent) if to.is_relative() => parent.join(to),
                _ => to,
            };
            target.as_path()
        }
        false => out,
    };
    check_replaceable(out, kind)?;
    let staging = staging_dir(out)?;
    let result = fill(&staging).and_then(|t| {
        replace_dir(&staging, out)?;
        Ok(t)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// A fresh directory beside `out` (same filesystem, so the final rename is atomic).
fn staging_dir(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .with_context(|| format!("{} has no directory name", out.display()))?
        .to_string_lossy();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = parent.join(format!(".{name}.{}.partial", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    Ok(staging)
}

/// Moves `staging` to `out`; an existing `out` is moved aside first and removed last.
fn replace_dir(staging: &Path, out: &Path) -> Result<()> {
    let old = if out.exists() {
        let aside = staging.with_extension("old");
        std::fs::rename(out, &aside)
            .with_context(|| format!("cannot move the old {} aside", out.display()))?;
        Some(aside)
    } else {
        None
    };
    std::fs::rename(staging, out)
        .with_context(|| format!("cannot move {} to {}", staging.display(), out.display()))?;
    if let Some(old) = old {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove {}", old.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT_FILES: DirKind = DirKind {
        what: "a test write",
        holds: |name| name.ends_with(".txt"),
    };

    #[test]
    fn a_failed_write_leaves_the_old_directory_and_a_foreign_file_is_refused() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let out = tmp.path().join("out");
        write_dir(&out, &TEXT_FILES, |d| {
            Ok(std::fs::write(d.join("a.txt"), "1")?)
        })?;
        assert_eq!(std::fs::read_to_string(out.join("a.txt"))?, "1");
        // A write that fails halfway: the old directory stands, no staging is left.
        let err = write_dir(&out, &TEXT_FILES, |d| -> Result<()> {
            std::fs::write(d.join("a.txt"), "2")?;
            bail!("the disk is full")
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "the disk is full");
        assert_eq!(std::fs::read_to_string(out.join("a.txt"))?, "1");
        assert_eq!(std::fs::read_dir(tmp.path())?.count(), 1, "no staging left");
        // A whole write replaces every file, stale ones included.
        write_dir(&out, &TEXT_FILES, |d| {
            Ok(std::fs::write(d.join("b.txt"), "3")?)
        })?;
        assert!(!out.join("a.txt").exists() && out.join("b.txt").exists());
        // A file the write does not make is never deleted.
        std::fs::write(out.join("notes.md"), "mine")?;
        let err = write_dir(&out, &TEXT_FILES, |_| Ok(())).unwrap_err();
        assert!(
            err.to_string().contains("already holds 'notes.md'"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(out.join("notes.md"))?, "mine");
        // Through a link, the link stays and its target is replaced.
        let elsewhere = tmp.path().join("elsewhere");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&elsewhere, &link)?;
        std::fs::create_dir(&elsewhere)?;
        write_dir(&link, &TEXT_FILES, |d| {
            Ok(std::fs::write(d.join("c.txt"), "4")?)
        })?;
        assert!(link.is_symlink() && elsewhere.join("c.txt").exists());
        Ok(())
    }
}
