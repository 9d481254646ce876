//! File-system helpers that keep outputs whole: a folder or file is written under a temporary
//! name beside its destination and renamed into place only once complete, so an interrupted run
//! never leaves something that looks finished.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A folder being written under a temporary name; removed on drop unless committed.
#[derive(Debug)]
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    overwrite: bool,
    committed: bool,
    /// Whether an uncommitted folder is removed on drop (not one adopted: its writers' work
    /// stays for a retry).
    remove_on_drop: bool,
}

impl AtomicDir {
    /// Starts writing `dest`; fails if it exists and `overwrite` is false.
    pub fn create(dest: &Path, overwrite: bool) -> std::io::Result<Self> {
        if dest.exists() && !overwrite {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists; pass --force to replace it", dest.display()),
            ));
        }
        let tmp = sibling(dest, "partial");
        fs::create_dir_all(&tmp)?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            overwrite,
            committed: false,
            remove_on_drop: true,
        })
    }

    /// Takes over `tmp`, a folder written elsewhere (a streamed release's shards, written by
    /// several workers), to be moved into `dest`, replacing what is there.
    pub fn adopt(tmp: &Path, dest: &Path) -> std::io::Result<Self> {
        if !tmp.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} is not a folder", tmp.display()),
            ));
        }
        Ok(Self {
            tmp: tmp.to_path_buf(),
            dest: dest.to_path_buf(),
            overwrite: true,
            committed: false,
            remove_on_drop: false,
        })
    }

    /// The temporary folder to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the finished folder into place (replacing an old one when allowed).
    pub fn commit(mut self) -> std::io::Result<()> {
        // One syncfs flushes every file written below the folder before it becomes visible.
        sync_filesystem(&self.tmp)?;
        if self.dest.exists() {
            if !self.overwrite {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} appeared while writing", self.dest.display()),
                ));
            }
            let old = sibling(&self.dest, "old");
            fs::rename(&self.dest, &old)?;
            fs::rename(&self.tmp, &self.dest)?;
            let _ = fs::remove_dir_all(&old);
        } else {
            fs::rename(&self.tmp, &self.dest)?;
        }
        if let Some(parent) = self.dest.parent() {
            let _ = sync_dir(parent);
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed && self.remove_on_drop {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Checks that `path` and everything below it (to `depth` levels of folders) resolves, links
/// followed, to a place below one of `roots`: a link inside a registered dataset folder must not
/// lead a reader out of it. Returns the first entry that leads out (relative to `path`), or an
/// error when the tree cannot be listed.
pub fn escapes_roots(
    path: &Path,
    roots: &[PathBuf],
    depth: usize,
) -> std::io::Result<Option<PathBuf>> {
    let roots: Vec<PathBuf> = roots.iter().filter_map(|r| r.canonicalize().ok()).collect();
    let inside = |p: &Path| match p.canonicalize() {
        Ok(real) => roots.iter().any(|r| real.starts_with(r)),
        // A dangling link leads nowhere readable; a reader reports it.
        Err(_) => true,
    };
    fn walk(
        dir: &Path,
        base: &Path,
        depth: usize,
        inside: &dyn Fn(&Path) -> bool,
    ) -> std::io::Result<Option<PathBuf>> {
        for entry in fs::read_dir(dir)? {
            let p = entry?.path();
            if !inside(&p) {
                return Ok(Some(p.strip_prefix(base).unwrap_or(&p).to_path_buf()));
            }
            if depth > 0
                && p.is_dir()
                && let Some(out) = walk(&p, base, depth - 1, inside)?
            {
                return Ok(Some(out));
            }
        }
        Ok(None)
    }
    if !inside(path) {
        return Ok(Some(PathBuf::from(".")));
    }
    if path.is_dir() {
        walk(path, path, depth, &inside)
    } else {
        Ok(None)
    }
}

/// Creates `dir` and its missing parents readable by the owner only (0700): the service's data
/// folder holds the sealing key, the database and the releases.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// Writes a whole file atomically, with the given Unix mode (e.g. 0o600 for secrets).
pub fn write_file_atomic(
    dest: &Path,
    bytes: &[u8],
    mode: u32,
    overwrite: bool,
) -> std::io::Result<()> {
    if dest.exists() && !overwrite {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists; pass --force to replace it", dest.display()),
        ));
    }
    let tmp = sibling(dest, "partial");
    let result = (|| {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, dest)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    #[cfg(not(unix))]
    let _ = mode;
    result
}

fn sibling(dest: &Path, what: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let mut nonce = [0u8; 6];
    let _ = getrandom::fill(&mut nonce);
    dest.with_file_name(format!(
        ".{name}.{what}-{}-{}",
        std::process::id(),
        hex::encode(nonce)
    ))
}

fn sync_filesystem(dir: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let f = fs::File::open(dir)?;
        // SAFETY: syncfs takes a valid open descriptor, which `f` holds for the call.
        if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_uncommitted_folder_leaves_nothing_behind() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("release");
        {
            let d = AtomicDir::create(&dest, false).unwrap();
            fs::write(d.path().join("a"), b"x").unwrap();
        }
        assert!(!dest.exists());
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 0);
    }

    #[test]
    fn existing_output_is_kept_unless_overwrite_is_given() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("release");
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("old"), b"1").unwrap();
        assert!(AtomicDir::create(&dest, false).is_err());
        let d = AtomicDir::create(&dest, true).unwrap();
        fs::write(d.path().join("new"), b"2").unwrap();
        d.commit().unwrap();
        assert!(dest.join("new").exists() && !dest.join("old").exists());
    }

    #[cfg(unix)]
    #[test]
    fn atomic_files_get_the_requested_mode() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("secret.json");
        write_file_atomic(&p, b"{}", 0o600, false).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(write_file_atomic(&p, b"{}", 0o600, false).is_err());
    }
}

/// Removes what interrupted writes of `dest` left beside it (`.NAME.partial-…` and
/// `.NAME.old-…`). Call it only while no other writer of `dest` can be running.
pub fn remove_leftovers(dest: &Path) -> std::io::Result<usize> {
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
        return Ok(0);
    };
    let name = name.to_string_lossy();
    let prefixes = [format!(".{name}.partial-"), format!(".{name}.old-")];
    let mut removed = 0;
    let entries = match fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let file = entry.file_name();
        let file = file.to_string_lossy();
        if prefixes.iter().any(|p| file.starts_with(p.as_str())) {
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod leftover_tests {
    use super::*;

    #[test]
    fn leftovers_of_one_destination_are_removed_and_others_kept() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("rel");
        fs::create_dir_all(d.path().join(".rel.partial-1-ab")).unwrap();
        fs::write(d.path().join(".rel.old-1-cd"), b"x").unwrap();
        fs::create_dir_all(d.path().join(".other.partial-1-ab")).unwrap();
        fs::create_dir_all(&dest).unwrap();
        assert_eq!(remove_leftovers(&dest).unwrap(), 2);
        assert!(dest.exists());
        assert!(d.path().join(".other.partial-1-ab").exists());
        assert!(!d.path().join(".rel.partial-1-ab").exists());
    }
}
