//! tmpfs mounts: one per volume, at the target path.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags};

/// One line of `/proc/self/mountinfo`, the parts we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount point.
    pub mount_point: PathBuf,
    /// Per-mount options (`ro,nosuid,nodev,noexec,...`).
    pub mount_options: String,
    /// Filesystem type.
    pub fs_type: String,
    /// Superblock options (`size=...,mode=...`).
    pub super_options: String,
}

impl MountEntry {
    /// Whether a per-mount option is set.
    pub fn has_option(&self, option: &str) -> bool {
        self.mount_options.split(',').any(|o| o == option)
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space and so on).
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = u32::from(bytes[i + 1] - b'0') * 64
                + u32::from(bytes[i + 2] - b'0') * 8
                + u32::from(bytes[i + 3] - b'0');
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                mount_point: unescape(left.get(4)?),
                mount_options: (*left.get(5)?).to_owned(),
                fs_type: (*right.first()?).to_owned(),
                super_options: right.get(2).map(|s| (*s).to_owned()).unwrap_or_default(),
            })
        })
        .collect()
}

/// The topmost mount at `path`, if `path` is a mount point.
pub fn mount_at(path: &Path) -> io::Result<Option<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path))
}

/// Options of a volume's tmpfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TmpfsOptions {
    /// `size=` in bytes.
    pub size_bytes: u64,
    /// Root directory mode (0o550).
    pub mode: u32,
    /// Root directory group (the pod's fsGroup).
    pub gid: Option<u32>,
}

/// Mounts a fresh tmpfs at `target`: `nodev,noexec,nosuid`, size-capped.
pub fn mount_tmpfs(target: &Path, opts: TmpfsOptions) -> io::Result<()> {
    let mut data = format!("size={},mode={:o}", opts.size_bytes, opts.mode);
    if let Some(gid) = opts.gid {
        data.push_str(&format!(",gid={gid}"));
    }
    let data = CString::new(data).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    rustix::mount::mount(
        "leasehold",
        target,
        "tmpfs",
        MountFlags::NODEV | MountFlags::NOEXEC | MountFlags::NOSUID,
        data.as_c_str(),
    )
    .map_err(io::Error::from)
}

/// How an unmount went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Unmounted at once.
    Clean,
    /// The mount was busy and was detached lazily (`MNT_DETACH`).
    Detached,
}

/// Unmounts `target`, detaching lazily when busy.
pub fn unmount(target: &Path) -> io::Result<Unmounted> {
    match rustix::mount::unmount(target, UnmountFlags::NOFOLLOW) {
        Ok(()) => Ok(Unmounted::Clean),
        Err(rustix::io::Errno::BUSY) => {
            rustix::mount::unmount(target, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW)
                .map(|()| Unmounted::Detached)
                .map_err(io::Error::from)
        }
        Err(e) => Err(e.into()),
    }
}

/// The filesystem type mounted at `path` if `path` is a mount point (`tmpfs`, or the
/// filesystem's magic number in hex), from a `statx` and a `statfs` — constant time,
/// where [`mount_at`] reads every line of `/proc/self/mountinfo` (hundreds on a busy
/// node, for every republish). `Ok(None)`: not a mount point, or the kernel does not
/// report mount roots (then use [`mount_at`]).
pub fn fs_type_if_mount_root(path: &Path) -> io::Result<Option<Option<String>>> {
    use rustix::fs::{AtFlags, CWD, StatxAttributes, StatxFlags, statfs, statx};
    let stx = match statx(CWD, path, AtFlags::empty(), StatxFlags::BASIC_STATS) {
        Ok(s) => s,
        Err(rustix::io::Errno::NOENT) => return Ok(Some(None)),
        Err(e) => return Err(e.into()),
    };
    let mask = stx.stx_attributes_mask;
    if !mask.contains(StatxAttributes::MOUNT_ROOT) {
        return Ok(None);
    }
    let attributes = stx.stx_attributes;
    if !attributes.contains(StatxAttributes::MOUNT_ROOT) {
        return Ok(Some(None));
    }
    let fs = statfs(path)?;
    // TMPFS_MAGIC (linux/magic.h).
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    #[allow(clippy::unnecessary_cast)]
    let magic = fs.f_type as i64;
    Ok(Some(Some(if magic == TMPFS_MAGIC {
        "tmpfs".to_owned()
    } else {
        format!("{magic:#x}")
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,nosuid,nodev,noexec,relatime shared:1 - tmpfs leasehold rw,size=1024k,mode=550\n\
                    22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n";
        let entries = parse_mountinfo(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(entries[0].fs_type, "tmpfs");
        assert!(entries[0].has_option("nodev") && entries[0].has_option("noexec"));
        assert_eq!(entries[0].super_options, "rw,size=1024k,mode=550");
        assert_eq!(entries[1].mount_point, PathBuf::from("/"));
    }

    #[test]
    fn mount_roots_are_told_apart_in_constant_time() {
        let dir = tempfile::tempdir().unwrap();
        match fs_type_if_mount_root(dir.path()).unwrap() {
            // A kernel without STATX_ATTR_MOUNT_ROOT: the caller reads mountinfo.
            None => return,
            Some(found) => assert_eq!(found, None, "a plain directory is no mount root"),
        }
        assert_eq!(
            fs_type_if_mount_root(&dir.path().join("missing")).unwrap(),
            Some(None)
        );
        assert!(matches!(
            fs_type_if_mount_root(Path::new("/")).unwrap(),
            Some(Some(_))
        ));
        if let Some(shm) = mount_at(Path::new("/dev/shm")).unwrap()
            && shm.fs_type == "tmpfs"
        {
            assert_eq!(
                fs_type_if_mount_root(Path::new("/dev/shm")).unwrap(),
                Some(Some("tmpfs".to_owned()))
            );
        }
    }
}
