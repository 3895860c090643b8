//! The restore's writer. Every path is opened relative to a root directory
//! descriptor (the target, or a tablespace directory) and never through a
//! symbolic link: `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or a
//! component-by-component `openat(O_NOFOLLOW)` walk where the kernel lacks
//! it. An entry already in the way (a forced restore) is replaced, never
//! written through, so no restore writes outside its roots whatever the
//! manifest or the old contents of the target hold.

use pg_hardstorage_engine::format::Entry;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A directory the restore writes beneath.
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

fn cstr(b: &[u8]) -> std::io::Result<CString> {
    CString::new(b).map_err(|_| std::io::Error::new(ErrorKind::InvalidInput, "path with NUL"))
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `openat(dir, name)` of one component, never following a link.
fn openat(dir: BorrowedFd, name: &[u8], flags: i32, mode: u32) -> std::io::Result<OwnedFd> {
    let c = cstr(name)?;
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: valid descriptor and NUL-terminated name; the result is owned.
    let fd = cvt(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, mode) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat2` beneath `dir` with no symlink anywhere; `None` where the
/// kernel has no openat2 (then the caller walks).
fn openat2(dir: BorrowedFd, rel: &[u8], flags: i32, mode: u32) -> Option<std::io::Result<OwnedFd>> {
    let c = match cstr(rel) {
        Ok(c) => c,
        Err(e) => return Some(Err(e)),
    };
    // SAFETY: open_how is plain data; zeroed is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        mode as u64
    } else {
        0
    };
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS;
    // SAFETY: the arguments match openat2(2); the result is owned.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if r >= 0 {
        return Some(Ok(unsafe { OwnedFd::from_raw_fd(r as i32) }));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // No openat2, or a seccomp filter that refuses unknown calls.
        Some(libc::ENOSYS) | Some(libc::EPERM) => None,
        _ => Some(Err(e)),
    }
}

/// Splits `a/b/c` into (`a/b`, `c`); (`""`, `c`) at the top.
fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|b| *b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

fn is_loop(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ELOOP) | Some(libc::EXDEV) | Some(libc::ENOTDIR)
    )
}

impl Root {
    /// Creates `path` (and its parents) and opens it; `path` itself must be
    /// a real directory, not a link to one.
    pub fn open(path: &Path) -> Result<Root, Problem> {
        std::fs::create_dir_all(path).map_err(|e| werr(path, e))?;
        let c = cstr(path.as_os_str().as_bytes()).map_err(|e| werr(path, e))?;
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: NUL-terminated path; the result is owned.
        let fd = cvt(unsafe { libc::open(c.as_ptr(), flags) }).map_err(|e| {
            Problem::io(
                Code::RestoreTargetInvalid,
                format!("{} (must be a directory, not a link)", path.display()),
                &e,
            )
        })?;
        Ok(Root {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn display(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.path.clone()
        } else {
            self.path.join(OsStr::from_bytes(rel))
        }
    }

    fn err(&self, rel: &[u8], e: std::io::Error) -> Problem {
        if is_loop(&e) {
            return Problem::new(
                Code::RestoreTargetInvalid,
                format!(
                    "{} passes through a symbolic link or a non-directory; a restore never writes through one",
                    self.display(rel).display()
                ),
            )
            .with("path", self.display(rel).display().to_string())
            .suggest("Restore into an empty directory", None);
        }
        werr(&self.display(rel), e)
    }

    /// Opens `rel` beneath the root, never through a link.
    fn open_rel(&self, rel: &[u8], flags: i32, mode: u32) -> std::io::Result<OwnedFd> {
        if rel.is_empty() {
            return self.fd.try_clone();
        }
        if let Some(r) = openat2(self.fd.as_fd(), rel, flags, mode) {
            return r;
        }
        let (parent, name) = split(rel);
        let mut dir = self.fd.try_clone()?;
        for c in parent.split(|b| *b == b'/') {
            dir = openat(dir.as_fd(), c, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        }
        openat(dir.as_fd(), name, flags, mode)
    }

    fn parent(&self, rel: &[u8]) -> Result<(OwnedFd, CString), Problem> {
        let (parent, name) = split(rel);
        let dir = self
            .open_rel(parent, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|e| self.err(parent, e))?;
        Ok((dir, cstr(name).map_err(|e| self.err(rel, e))?))
    }

    /// Removes whatever is at `name` in `dir` (a file or a link; an empty
    /// directory too), so the caller creates a fresh entry in its place.
    fn remove(&self, dir: &OwnedFd, name: &CString, rel: &[u8]) -> Result<(), Problem> {
        // SAFETY: valid descriptor and NUL-terminated name.
        let r = unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EISDIR) {
            // SAFETY: as above.
            let r = unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) };
            if r == 0 {
                return Ok(());
            }
            return Err(self.err(rel, std::io::Error::last_os_error()));
        }
        if e.kind() == ErrorKind::NotFound {
            return Ok(());
        }
        Err(self.err(rel, e))
    }

    /// Makes the directory `rel`; one already there is kept, anything else
    /// in its place (a link, a file) is replaced.
    pub fn mkdir(&self, rel: &[u8]) -> Result<(), Problem> {
        if rel.is_empty() {
            return Ok(());
        }
        let (dir, name) = self.parent(rel)?;
        for _ in 0..2 {
            // SAFETY: valid descriptor and NUL-terminated name.
            if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) } == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::AlreadyExists {
                return Err(self.err(rel, e));
            }
            match openat(
                dir.as_fd(),
                name.as_bytes(),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            ) {
                Ok(_) => return Ok(()),
                Err(_) => self.remove(&dir, &name, rel)?,
            }
        }
        Err(self.err(rel, std::io::Error::from(ErrorKind::AlreadyExists)))
    }

    /// Creates the regular file `rel` afresh (whatever was there is
    /// replaced), `len` bytes long and all holes.
    pub fn create_file(&self, rel: &[u8], len: u64) -> Result<File, Problem> {
        let (dir, name) = self.parent(rel)?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        for _ in 0..2 {
            match openat(dir.as_fd(), name.as_bytes(), flags, 0o600) {
                Ok(fd) => {
                    let f = File::from(fd);
                    f.set_len(len).map_err(|e| self.err(rel, e))?;
                    return Ok(f);
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => self.remove(&dir, &name, rel)?,
                Err(e) => return Err(self.err(rel, e)),
            }
        }
        Err(self.err(rel, std::io::Error::from(ErrorKind::AlreadyExists)))
    }

    /// Opens the regular file `rel` for writing (no create, no link).
    pub fn open_file(&self, rel: &[u8]) -> Result<File, Problem> {
        self.open_rel(rel, libc::O_WRONLY, 0)
            .map(File::from)
            .map_err(|e| self.err(rel, e))
    }

    /// Opens the regular file `rel` for reading; `None` when there is none
    /// (absent, or a link or a non-directory on the way).
    pub fn open_read(&self, rel: &[u8]) -> Result<Option<File>, Problem> {
        match self.open_rel(rel, libc::O_RDONLY, 0) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(e) if e.kind() == ErrorKind::NotFound || is_loop(&e) => Ok(None),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    /// Appends `data` to the file `rel`, creating it; a link in its place
    /// is replaced by a new file, never followed.
    pub fn append(&self, rel: &[u8], data: &[u8]) -> Result<File, Problem> {
        use std::io::Write;
        let flags = libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT;
        let mut f = match self.open_rel(rel, flags, 0o600) {
            Ok(fd) => File::from(fd),
            Err(e) if is_loop(&e) && !split(rel).0.is_empty() => return Err(self.err(rel, e)),
            Err(e) if is_loop(&e) => self.create_file(rel, 0)?,
            Err(e) => return Err(self.err(rel, e)),
        };
        f.write_all(data).map_err(|e| self.err(rel, e))?;
        Ok(f)
    }

    /// Creates the link `rel` → `target` (the target is never resolved by
    /// us); whatever was at `rel` is replaced.
    pub fn symlink(&self, rel: &[u8], target: &[u8]) -> Result<(), Problem> {
        let (dir, name) = self.parent(rel)?;
        let t = cstr(target).map_err(|e| self.err(rel, e))?;
        for _ in 0..2 {
            // SAFETY: NUL-terminated strings and a valid descriptor.
            if unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), name.as_ptr()) } == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::AlreadyExists {
                return Err(self.err(rel, e));
            }
            self.remove(&dir, &name, rel)?;
        }
        Err(self.err(rel, std::io::Error::from(ErrorKind::AlreadyExists)))
    }

    /// Mode, owner (as root) and times of a file or directory, through a
    /// descriptor opened beneath the root.
    pub fn finish(&self, rel: &[u8], e: &Entry, dir: bool) -> Result<(), Problem> {
        let flags = if dir {
            libc::O_RDONLY | libc::O_DIRECTORY
        } else {
            libc::O_WRONLY
        };
        let f = File::from(
            self.open_rel(rel, flags, 0)
                .map_err(|er| self.err(rel, er))?,
        );
        finish_fd(&f, e).map_err(|er| self.err(rel, er))
    }

    /// Owner and times of the link `rel` itself.
    pub fn finish_symlink(&self, rel: &[u8], e: &Entry) -> Result<(), Problem> {
        let (dir, name) = self.parent(rel)?;
        let fd = dir.as_raw_fd();
        if unsafe { libc::geteuid() } == 0 {
            // SAFETY: valid descriptor and name; AT_SYMLINK_NOFOLLOW acts on the link.
            let r = unsafe {
                libc::fchownat(fd, name.as_ptr(), e.uid, e.gid, libc::AT_SYMLINK_NOFOLLOW)
            };
            cvt(r).map_err(|er| self.err(rel, er))?;
        }
        let ts = [timespec(e), timespec(e)];
        // SAFETY: as above, with two valid timespecs.
        let r =
            unsafe { libc::utimensat(fd, name.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
        cvt(r).map(|_| ()).map_err(|er| self.err(rel, er))
    }

    /// Flushes everything written under the root to stable storage.
    pub fn sync(&self) -> Result<(), Problem> {
        // SAFETY: syncfs on a valid open descriptor.
        cvt(unsafe { libc::syncfs(self.fd.as_raw_fd()) })
            .map(|_| ())
            .map_err(|e| werr(&self.path, e))
    }

    /// Removes the file `rel` (the in-progress marker).
    pub fn remove_file(&self, rel: &[u8]) -> Result<(), Problem> {
        let (dir, name) = self.parent(rel)?;
        self.remove(&dir, &name, rel)
    }
}

fn timespec(e: &Entry) -> libc::timespec {
    libc::timespec {
        tv_sec: e.mtime_s as libc::time_t,
        tv_nsec: e.mtime_ns.min(999_999_999) as _,
    }
}

fn finish_fd(f: &File, e: &Entry) -> std::io::Result<()> {
    let fd = f.as_raw_fd();
    if unsafe { libc::geteuid() } == 0 {
        // SAFETY: valid descriptor.
        cvt(unsafe { libc::fchown(fd, e.uid, e.gid) })?;
    }
    // SAFETY: valid descriptor.
    cvt(unsafe { libc::fchmod(fd, (e.mode & 0o7777) as libc::mode_t) })?;
    let ts = [timespec(e), timespec(e)];
    // SAFETY: valid descriptor and two valid timespecs.
    cvt(unsafe { libc::futimens(fd, ts.as_ptr()) })?;
    Ok(())
}

pub fn werr(p: &Path, e: std::io::Error) -> Problem {
    Problem::io(Code::IoWriteFailed, format!("write {}", p.display()), &e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_written_through_a_link() {
        let tmp = tempfile::tempdir().expect("tmp");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("victim"), b"keep").expect("write");
        let root = Root::open(&tmp.path().join("t")).expect("root");
        std::os::unix::fs::symlink(&outside, tmp.path().join("t/base")).expect("ln");
        std::os::unix::fs::symlink(outside.join("victim"), tmp.path().join("t/f")).expect("ln");
        // A file beneath a linked directory: refused.
        let e = root
            .create_file(b"base/victim", 1)
            .map(|_| ())
            .expect_err("refused");
        assert_eq!(e.code.as_ref(), "restore.target_invalid", "{e:?}");
        // A link in a file's place: replaced, not followed.
        root.create_file(b"f", 3).expect("replaced");
        root.append(b"f", b"x").expect("append");
        // A link in a directory's place: replaced by a directory.
        root.mkdir(b"base").expect("replaced");
        root.create_file(b"base/victim", 1).expect("now inside");
        assert_eq!(
            std::fs::read(outside.join("victim")).expect("read"),
            b"keep"
        );
        assert!(std::fs::symlink_metadata(tmp.path().join("t/base"))
            .expect("meta")
            .is_dir());
    }
}
