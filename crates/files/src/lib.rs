//! Atomic credential directories and atomic single-file writes.
//!
//! [`AtomicDir`] follows the layout of the kubelet's atomic writer:
//!
//! ```text
//! root/
//!   ..2026_05_01_10_00_00.1a2b3c4d/   the current version (files, 0440; dirs, 0550)
//!   ..data -> ..2026_05_01_10_00_00.1a2b3c4d
//!   password -> ..data/password       user-visible names
//!   username -> ..data/username
//! ```
//!
//! A new version is written to a fresh hidden directory, fsynced, and published
//! by renaming a temporary symlink over `..data`. `rename(2)` is atomic, so a
//! reader that opens `root/<name>` sees the complete old or the complete new file.
//! A reader that needs several files from the *same* version resolves `..data`
//! once and reads every file relative to it (as [`AtomicDir::read_current`] does).
//!
//! One writer per root: callers serialise writes to the same root (the CSI driver
//! holds a per-volume guard). File contents never appear in errors or `Debug`.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt, fchown};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use secrecy::{ExposeSecret, SecretSlice, SecretString};

/// Name of the symlink that points at the current version directory.
pub const DATA_LINK: &str = "..data";
const DATA_TMP_LINK: &str = "..data_tmp";
/// Prefix of every internal entry; user-visible names may not start with it.
const RESERVED_PREFIX: &str = "..";
const MAX_NAME_LEN: usize = 4096;
const MAX_COMPONENT_LEN: usize = 255;

/// Secret bytes as stored by [`AtomicDir`].
pub type SecretBytes = SecretSlice<u8>;

/// Anything that can hand its secret content over as bytes for writing.
pub trait SecretContent {
    /// The secret bytes. Callers must not log them.
    fn secret_bytes(&self) -> &[u8];
}

impl SecretContent for SecretSlice<u8> {
    fn secret_bytes(&self) -> &[u8] {
        self.expose_secret()
    }
}

impl SecretContent for SecretString {
    fn secret_bytes(&self) -> &[u8] {
        self.expose_secret().as_bytes()
    }
}

/// Modes and ownership of what [`AtomicDir::write`] creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// Mode of every file (default 0o440).
    pub file_mode: u32,
    /// Mode of the version directory and its subdirectories (default 0o550).
    pub dir_mode: u32,
    /// Group owner of files and directories (a pod's fsGroup), if any.
    pub gid: Option<u32>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            file_mode: 0o440,
            dir_mode: 0o550,
            gid: None,
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOutcome {
    /// False when the content and options were already in place (no new directory).
    pub changed: bool,
    /// Name of the version directory `..data` now points at.
    pub data_dir: String,
    /// User-visible names removed because they were not in the new payload.
    pub removed: Vec<String>,
}

/// The files of the current version, read consistently from one directory.
#[derive(Debug)]
pub struct CurrentData {
    /// Name of the version directory the files were read from.
    pub data_dir: String,
    /// Relative name → content. `SecretSlice`'s `Debug` is redacted.
    pub files: BTreeMap<String, SecretBytes>,
}

/// Errors of this crate. They name paths and operations, never contents.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A payload name that is not a safe relative path.
    #[error("invalid file name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name (a name, not a secret).
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// An I/O operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// The operation, such as "create" or "rename".
        op: &'static str,
        /// The path it was applied to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `..data` kept changing while it was read.
    #[error("{} changed during every read attempt", path.display())]
    Unstable {
        /// The root directory.
        path: PathBuf,
    },
}

/// Result type of this crate.
pub type Result<T, E = FilesError> = std::result::Result<T, E>;

fn io_err(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> FilesError {
    let path = path.into();
    move |source| FilesError::Io { op, path, source }
}

/// Checks that `name` is a safe relative path for a payload entry.
pub fn validate_name(name: &str) -> Result<()> {
    let invalid = |reason| {
        Err(FilesError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return invalid("too long");
    }
    if name.starts_with('/') {
        return invalid("absolute path");
    }
    if name.contains('\0') {
        return invalid("contains NUL");
    }
    for component in name.split('/') {
        match component {
            "" => return invalid("empty path component"),
            "." => return invalid("'.' component"),
            ".." => return invalid("'..' component"),
            c if c.len() > MAX_COMPONENT_LEN => return invalid("path component too long"),
            _ => {}
        }
    }
    if name.starts_with(RESERVED_PREFIX) {
        return invalid("names starting with '..' are reserved");
    }
    Ok(())
}

/// Validates every name and rejects payloads where one name is a directory
/// prefix of another ("a" and "a/b").
fn validate_payload<'a>(names: impl Iterator<Item = &'a String>) -> Result<()> {
    let names: BTreeSet<&str> = names.map(String::as_str).collect();
    for name in &names {
        validate_name(name)?;
        let mut prefix_end = 0;
        while let Some(pos) = name[prefix_end..].find('/') {
            let prefix = &name[..prefix_end + pos];
            if names.contains(prefix) {
                return Err(FilesError::InvalidName {
                    name: (*name).to_owned(),
                    reason: "a parent directory is also a file",
                });
            }
            prefix_end += pos + 1;
        }
    }
    Ok(())
}

fn top_level(name: &str) -> &str {
    name.split('/').next().unwrap_or(name)
}

/// A directory whose content is replaced atomically as a whole.
#[derive(Debug, Clone)]
pub struct AtomicDir {
    root: PathBuf,
}

impl AtomicDir {
    /// A writer for `root`, which must exist when writing.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The name of the version directory `..data` points at, if any.
    pub fn current_data_dir(&self) -> Result<Option<String>> {
        let link = self.root.join(DATA_LINK);
        match fs::read_link(&link) {
            Ok(target) => Ok(Some(target.to_string_lossy().into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("readlink", link)(e)),
        }
    }

    /// Replaces the directory's content with `files`.
    ///
    /// Does nothing (and returns `changed: false`) when the current version has
    /// exactly these names, contents, modes and group.
    pub fn write<V: SecretContent>(
        &self,
        files: &BTreeMap<String, V>,
        opts: WriteOptions,
    ) -> Result<WriteOutcome> {
        validate_payload(files.keys())?;
        let root_meta = fs::metadata(&self.root).map_err(io_err("stat", &self.root))?;
        if !root_meta.is_dir() {
            return Err(FilesError::Io {
                op: "open root",
                path: self.root.clone(),
                source: io::Error::from(io::ErrorKind::NotADirectory),
            });
        }
        let top: BTreeSet<&str> = files.keys().map(|n| top_level(n)).collect();

        if let Some(current) = self.current_data_dir()?
            && self.version_matches(&current, files, opts)?
        {
            self.link_visible(&top)?;
            let removed = self.remove_stale_visible(&top)?;
            return Ok(WriteOutcome {
                changed: false,
                data_dir: current,
                removed,
            });
        }

        let data_dir = self.write_version_dir(files, opts)?;

        // Publish: a fresh symlink renamed over `..data`.
        let tmp_link = self.root.join(DATA_TMP_LINK);
        remove_if_exists(&tmp_link)?;
        std::os::unix::fs::symlink(&data_dir, &tmp_link).map_err(io_err("symlink", &tmp_link))?;
        let data_link = self.root.join(DATA_LINK);
        fs::rename(&tmp_link, &data_link).map_err(io_err("rename", &data_link))?;
        fsync_dir(&self.root)?;

        self.link_visible(&top)?;
        let removed = self.remove_stale_visible(&top)?;
        self.remove_old_versions(&data_dir)?;
        fsync_dir(&self.root)?;
        Ok(WriteOutcome {
            changed: true,
            data_dir,
            removed,
        })
    }

    /// Reads every file of the current version, all from the same version
    /// directory. `None` when nothing was written yet.
    pub fn read_current(&self) -> Result<Option<CurrentData>> {
        // A writer may swap and delete the version between readlink and the
        // reads; retry a few times on NotFound.
        for _ in 0..32 {
            let Some(data_dir) = self.current_data_dir()? else {
                return Ok(None);
            };
            let path = self.root.join(&data_dir);
            let dir = match rustix::fs::open(
                &path,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(io_err("open", path)(e.into())),
            };
            let mut files = BTreeMap::new();
            match read_tree(&dir, "", &mut files) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("read", path)(e)),
            }
            // The writer deletes a version only after swapping `..data` away from
            // it, so if `..data` still points here the read saw a complete version.
            if self.current_data_dir()?.as_deref() == Some(data_dir.as_str()) {
                return Ok(Some(CurrentData { data_dir, files }));
            }
        }
        Err(FilesError::Unstable {
            path: self.root.clone(),
        })
    }

    /// Removes everything inside the root (not the root itself, which may be a
    /// mount point). Succeeds when the root does not exist.
    pub fn remove_all(&self) -> Result<()> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("read_dir", &self.root)(e)),
        };
        // Visible links first, then `..data`, then the version directories, so
        // a concurrent reader never follows a link into a half-removed version.
        let mut visible = Vec::new();
        let mut internal = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("read_dir", &self.root))?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(RESERVED_PREFIX) {
                internal.push(name);
            } else {
                visible.push(name);
            }
        }
        internal.sort_by_key(|n| n != OsStr::new(DATA_LINK));
        for name in visible.iter().chain(internal.iter()) {
            remove_tree(&self.root.join(name))?;
        }
        fsync_dir(&self.root)
    }

    fn version_matches<V: SecretContent>(
        &self,
        data_dir: &str,
        files: &BTreeMap<String, V>,
        opts: WriteOptions,
    ) -> Result<bool> {
        let dir = self.root.join(data_dir);
        let meta = match fs::symlink_metadata(&dir) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("stat", dir)(e)),
        };
        if !meta.is_dir() || !owner_matches(&meta, opts.dir_mode, opts.gid) {
            return Ok(false);
        }
        let mut existing = Vec::new();
        list_files(&dir, "", &mut existing).map_err(io_err("read_dir", &dir))?;
        if existing.len() != files.len() || existing.iter().any(|n| !files.contains_key(n)) {
            return Ok(false);
        }
        for (name, content) in files {
            let path = dir.join(name);
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(io_err("open", path)(e)),
            };
            let meta = file.metadata().map_err(io_err("stat", &path))?;
            let want = content.secret_bytes();
            if !owner_matches(&meta, opts.file_mode, opts.gid) || meta.len() != want.len() as u64 {
                return Ok(false);
            }
            let mut buf = Vec::with_capacity(want.len());
            let read = file.read_to_end(&mut buf);
            // Wrapped at once so the copy is zeroed on drop, error or not.
            let have = SecretSlice::from(buf);
            read.map_err(io_err("read", &path))?;
            if !constant_time_eq(have.expose_secret(), want) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn write_version_dir<V: SecretContent>(
        &self,
        files: &BTreeMap<String, V>,
        opts: WriteOptions,
    ) -> Result<String> {
        let stamp = jiff::Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S");
        let name = format!("{RESERVED_PREFIX}{stamp}.{:08x}", rand::random::<u32>());
        let dir = self.root.join(&name);
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("mkdir", &dir))?;
        let result = self.fill_version_dir(&dir, files, opts);
        if let Err(e) = result {
            // Best effort: do not leave a half-written version behind.
            let _ = remove_tree(&dir);
            return Err(e);
        }
        Ok(name)
    }

    fn fill_version_dir<V: SecretContent>(
        &self,
        dir: &Path,
        files: &BTreeMap<String, V>,
        opts: WriteOptions,
    ) -> Result<()> {
        let mut subdirs = BTreeSet::new();
        for (name, content) in files {
            let path = dir.join(name);
            let mut parent = Path::new(name.as_str()).parent();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                subdirs.insert(p.to_path_buf());
                parent = p.parent();
            }
            if let Some(parent) = path.parent() {
                DirBuilder::new()
                    .mode(0o700)
                    .recursive(true)
                    .create(parent)
                    .map_err(io_err("mkdir", parent))?;
            }
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc_nofollow())
                .open(&path)
                .map_err(io_err("create", &path))?;
            file.write_all(content.secret_bytes())
                .map_err(io_err("write", &path))?;
            set_owner_mode(&file, opts.file_mode, opts.gid).map_err(io_err("chmod", &path))?;
            file.sync_all().map_err(io_err("fsync", &path))?;
        }
        // Deepest first, so each directory is fsynced after its children.
        for sub in subdirs.iter().rev() {
            let path = dir.join(sub);
            let d = File::open(&path).map_err(io_err("open", &path))?;
            set_owner_mode(&d, opts.dir_mode, opts.gid).map_err(io_err("chmod", &path))?;
            d.sync_all().map_err(io_err("fsync", &path))?;
        }
        let d = File::open(dir).map_err(io_err("open", dir))?;
        set_owner_mode(&d, opts.dir_mode, opts.gid).map_err(io_err("chmod", dir))?;
        d.sync_all().map_err(io_err("fsync", dir))?;
        Ok(())
    }

    /// Makes `name -> ..data/name` for every top-level name, replacing wrong
    /// links atomically.
    fn link_visible(&self, top: &BTreeSet<&str>) -> Result<()> {
        for name in top {
            let target = PathBuf::from(DATA_LINK).join(name);
            let link = self.root.join(name);
            match fs::read_link(&link) {
                Ok(existing) if existing == target => continue,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Not a symlink (EINVAL) is replaced below; rename fails on a directory.
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {}
                Err(e) => return Err(io_err("readlink", link)(e)),
            }
            let tmp = self.root.join(format!("{RESERVED_PREFIX}tmp_{name}"));
            remove_if_exists(&tmp)?;
            std::os::unix::fs::symlink(&target, &tmp).map_err(io_err("symlink", &tmp))?;
            fs::rename(&tmp, &link).map_err(io_err("rename", &link))?;
        }
        Ok(())
    }

    /// Removes visible links into `..data` whose names are no longer in the payload.
    fn remove_stale_visible(&self, top: &BTreeSet<&str>) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_err("read_dir", &self.root))? {
            let entry = entry.map_err(io_err("read_dir", &self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(RESERVED_PREFIX) || top.contains(name.as_str()) {
                continue;
            }
            let path = entry.path();
            if let Ok(target) = fs::read_link(&path)
                && target.starts_with(DATA_LINK)
            {
                remove_if_exists(&path)?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// Removes every internal entry except `..data` and the current version
    /// (the replaced version and leftovers of interrupted writes).
    fn remove_old_versions(&self, keep: &str) -> Result<()> {
        for entry in fs::read_dir(&self.root).map_err(io_err("read_dir", &self.root))? {
            let entry = entry.map_err(io_err("read_dir", &self.root))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(RESERVED_PREFIX) && name != DATA_LINK && name != keep {
                remove_tree(&entry.path())?;
            }
        }
        Ok(())
    }
}

fn libc_nofollow() -> i32 {
    OFlags::NOFOLLOW.bits() as i32
}

fn owner_matches(meta: &fs::Metadata, mode: u32, gid: Option<u32>) -> bool {
    meta.mode() & 0o7777 == mode && gid.is_none_or(|g| meta.gid() == g)
}

fn set_owner_mode(file: &File, mode: u32, gid: Option<u32>) -> io::Result<()> {
    if let Some(gid) = gid {
        fchown(file, None, Some(gid))?;
    }
    // After chown: chown may clear set-id bits, and the umask does not apply here.
    file.set_permissions(fs::Permissions::from_mode(mode))
}

fn fsync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", path))
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

/// Removes a file, symlink or directory tree, making read-only directories
/// writable first (they are 0550 once written, which stops a non-root owner).
fn remove_tree(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("stat", path)(e)),
    };
    if !meta.is_dir() {
        return remove_if_exists(path);
    }
    if meta.mode() & 0o700 != 0o700 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", path))?;
    }
    for entry in fs::read_dir(path).map_err(io_err("read_dir", path))? {
        let entry = entry.map_err(io_err("read_dir", path))?;
        remove_tree(&entry.path())?;
    }
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("rmdir", path)(e)),
    }
}

fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let ty = entry.file_type()?;
        if ty.is_dir() {
            list_files(&entry.path(), &rel, out)?;
        } else {
            out.push(rel);
        }
    }
    Ok(())
}

/// Reads every regular file under `dir` (an open directory), relative to it.
fn read_tree(
    dir: &OwnedFd,
    prefix: &str,
    out: &mut BTreeMap<String, SecretBytes>,
) -> io::Result<()> {
    let entries = rustix::fs::Dir::read_from(dir.as_fd())?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." {
            continue;
        }
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let fd = rustix::fs::openat(
            dir.as_fd(),
            name.as_str(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let stat = rustix::fs::fstat(&fd)?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode).is_dir() {
            read_tree(&fd, &rel, out)?;
        } else {
            let mut file = File::from(fd);
            let mut buf = Vec::new();
            let read = file.read_to_end(&mut buf);
            let content = SecretSlice::from(buf);
            read?;
            out.insert(rel, content);
        }
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, created with `mode`, fsynced, renamed over `path`, and the
/// directory fsynced. For state and metadata files (typically 0o600).
pub fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| FilesError::InvalidName {
            name: path.display().to_string(),
            reason: "no file name",
        })?
        .to_string_lossy();
    let tmp = parent.join(format!(".{file_name}.tmp-{:08x}", rand::random::<u32>()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o777)
            .custom_flags(libc_nofollow())
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        file.write_all(bytes).map_err(io_err("write", &tmp))?;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &tmp))?;
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("rename", path))?;
        fsync_dir(parent)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests;
