//! A FUSE file system over a real directory that keeps every write in memory until the file is
//! fsynced, and can drop whatever is still unsynced at once: a power cut, as far as a program's
//! data is concerned (in the spirit of LazyFS). Metadata (creating, renaming, removing, resizing
//! files and directories) goes to the real directory at once, as a journaling file system would
//! have it after a crash; file contents reach it only through fsync. After [`LazyFs::cut`] the
//! real directory holds exactly what a machine that lost power would find on its disk.
//!
//! Mounting needs root (the mount syscall); the test that uses it says so when it cannot.
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
};

/// The kernel asks again every time: sizes change under it as writes land in memory only.
const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;

/// The bytes of one file written since its last fsync: one span `[start, start + bytes.len())`
/// over the real file (the hull of every write since; appends keep it tight), and the size the
/// file has for its readers.
struct Unsynced {
    start: u64,
    bytes: Vec<u8>,
    len: u64,
}

#[derive(Default)]
struct State {
    paths: HashMap<u64, PathBuf>,
    inodes: HashMap<PathBuf, u64>,
    next_inode: u64,
    unsynced: HashMap<u64, Unsynced>,
    files: HashMap<u64, File>,
    /// Fsyncs seen (with what `cut` returns, the test's evidence that both happened).
    fsyncs: u64,
}

/// The mounted file system; unmounted on drop.
pub struct LazyFs {
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
}

impl LazyFs {
    /// Mounts `backing` at `mountpoint`.
    pub fn mount(backing: &Path, mountpoint: &Path) -> std::io::Result<Self> {
        let mut state = State {
            next_inode: ROOT + 1,
            ..State::default()
        };
        state.paths.insert(ROOT, backing.to_path_buf());
        state.inodes.insert(backing.to_path_buf(), ROOT);
        let state = Arc::new(Mutex::new(state));
        let options = [MountOption::FSName("lazyfs".into()), MountOption::NoAtime];
        let session = fuser::spawn_mount2(Volatile(state.clone()), mountpoint, &options)?;
        Ok(Self {
            state,
            session: Some(session),
        })
    }

    /// Drops every write not yet fsynced, as a power cut would; returns how many bytes went.
    pub fn cut(&self) -> u64 {
        let mut state = self.state.lock().unwrap();
        state.unsynced.drain().map(|(_, u)| u.bytes.len() as u64).sum()
    }

    pub fn fsyncs(&self) -> u64 {
        self.state.lock().unwrap().fsyncs
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            session.join();
        }
    }
}

struct Volatile(Arc<Mutex<State>>);

fn errno(error: &std::io::Error) -> i32 {
    error.raw_os_error().unwrap_or(libc::EIO)
}

impl State {
    fn path(&self, inode: u64) -> Result<PathBuf, i32> {
        self.paths.get(&inode).cloned().ok_or(libc::ENOENT)
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, i32> {
        Ok(self.path(parent)?.join(name))
    }

    fn inode(&mut self, path: &Path) -> u64 {
        if let Some(&inode) = self.inodes.get(path) {
            return inode;
        }
        let inode = self.next_inode;
        self.next_inode += 1;
        self.paths.insert(inode, path.to_path_buf());
        self.inodes.insert(path.to_path_buf(), inode);
        inode
    }

    /// Removes an entry (`remove`: a file's or a directory's call) and forgets its inode.
    fn remove(&mut self, parent: u64, name: &OsStr, remove: impl Fn(&Path) -> std::io::Result<()>) -> Result<(), i32> {
        let path = self.child(parent, name)?;
        remove(&path).map_err(|e| errno(&e))?;
        self.forget_path(&path);
        Ok(())
    }

    fn forget_path(&mut self, path: &Path) {
        if let Some(inode) = self.inodes.remove(path) {
            self.paths.remove(&inode);
            self.unsynced.remove(&inode);
            self.files.remove(&inode);
        }
    }

    fn file(&mut self, inode: u64) -> Result<&File, i32> {
        if !self.files.contains_key(&inode) {
            let path = self.path(inode)?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| errno(&e))?;
            self.files.insert(inode, file);
        }
        Ok(&self.files[&inode])
    }

    /// The attributes the real file has, with the size its readers see.
    fn attr(&mut self, inode: u64) -> Result<FileAttr, i32> {
        let meta = std::fs::symlink_metadata(self.path(inode)?).map_err(|e| errno(&e))?;
        let size = self.unsynced.get(&inode).map_or(meta.size(), |u| u.len);
        let time = |secs: i64, nanos: i64| UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos as u32);
        Ok(FileAttr {
            ino: inode,
            size,
            blocks: size.div_ceil(512),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind: if meta.is_dir() {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// `len` bytes at `offset` as a reader sees them: the real file (zeros past its end, up to
    /// the readers' size), overlaid by the unsynced span.
    fn view(&mut self, inode: u64, offset: u64, len: u64) -> Result<Vec<u8>, i32> {
        let size = self.attr(inode)?.size;
        let end = (offset + len).min(size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = vec![0; (end - offset) as usize];
        let file = self.file(inode)?;
        let mut done = 0;
        while done < out.len() {
            match file.read_at(&mut out[done..], offset + done as u64) {
                Ok(0) => break, // past the real file's end: zeros
                Ok(n) => done += n,
                Err(e) => return Err(errno(&e)),
            }
        }
        if let Some(u) = self.unsynced.get(&inode) {
            let (from, to) = (u.start.max(offset), (u.start + u.bytes.len() as u64).min(end));
            if from < to {
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&u.bytes[(from - u.start) as usize..(to - u.start) as usize]);
            }
        }
        Ok(out)
    }

    fn write(&mut self, inode: u64, offset: u64, data: &[u8]) -> Result<(), i32> {
        let end = offset + data.len() as u64;
        let (start, hull_end, len) = match self.unsynced.get(&inode) {
            Some(u) => (
                u.start.min(offset),
                (u.start + u.bytes.len() as u64).max(end),
                u.len.max(end),
            ),
            None => (offset, end, self.attr(inode)?.size.max(end)),
        };
        // The new span starts as the file reads now, then takes the write.
        let mut bytes = self.view(inode, start, hull_end - start)?;
        bytes.resize((hull_end - start) as usize, 0);
        bytes[(offset - start) as usize..(end - start) as usize].copy_from_slice(data);
        self.unsynced.insert(inode, Unsynced { start, bytes, len });
        Ok(())
    }

    fn fsync(&mut self, inode: u64) -> Result<(), i32> {
        self.fsyncs += 1;
        let Some(u) = self.unsynced.remove(&inode) else {
            return Ok(());
        };
        let file = self.file(inode)?;
        file.write_all_at(&u.bytes, u.start).map_err(|e| errno(&e))?;
        file.set_len(u.len).map_err(|e| errno(&e))?;
        file.sync_data().map_err(|e| errno(&e))
    }

    /// Resizing is metadata: it reaches the real file at once, and the unsynced span is cut to it.
    fn resize(&mut self, inode: u64, size: u64) -> Result<(), i32> {
        self.file(inode)?.set_len(size).map_err(|e| errno(&e))?;
        if let Some(mut u) = self.unsynced.remove(&inode) {
            if size > u.start {
                u.bytes.truncate((size - u.start) as usize);
                u.len = size;
                self.unsynced.insert(inode, u);
            }
        }
        Ok(())
    }
}

impl Volatile {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }
}

macro_rules! reply_or_error {
    ($reply:expr, $result:expr, $ok:expr) => {
        match $result {
            Ok(value) => $ok(value),
            Err(code) => $reply.error(code),
        }
    };
}

impl Filesystem for Volatile {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let mut state = self.state();
        let result = state.child(parent, name).and_then(|path| {
            std::fs::symlink_metadata(&path).map_err(|e| errno(&e))?;
            let inode = state.inode(&path);
            state.attr(inode)
        });
        reply_or_error!(reply, result, |attr| reply.entry(&TTL, &attr, 0));
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let result = self.state().attr(ino);
        reply_or_error!(reply, result, |attr| reply.attr(&TTL, &attr));
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut state = self.state();
        let result = size
            .map_or(Ok(()), |size| state.resize(ino, size))
            .and_then(|()| state.attr(ino));
        reply_or_error!(reply, result, |attr| reply.attr(&TTL, &attr));
    }

    fn mkdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let mut state = self.state();
        let result = state.child(parent, name).and_then(|path| {
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(&path)
                .map_err(|e| errno(&e))?;
            let inode = state.inode(&path);
            state.attr(inode)
        });
        reply_or_error!(reply, result, |attr| reply.entry(&TTL, &attr, 0));
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let result = self.state().remove(parent, name, |path| std::fs::remove_file(path));
        reply_or_error!(reply, result, |()| reply.ok());
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let result = self.state().remove(parent, name, |path| std::fs::remove_dir(path));
        reply_or_error!(reply, result, |()| reply.ok());
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        let result = state.child(parent, name).and_then(|from| {
            let to = state.child(newparent, newname)?;
            std::fs::rename(&from, &to).map_err(|e| errno(&e))?;
            state.forget_path(&to);
            // The moved entry and everything below it keep their inodes under the new path.
            let moved: Vec<(PathBuf, u64)> = state
                .inodes
                .iter()
                .filter(|(path, _)| path.starts_with(&from))
                .map(|(path, &inode)| (path.clone(), inode))
                .collect();
            for (path, inode) in moved {
                let below = path.strip_prefix(&from).expect("under from");
                // join("") would add a trailing slash, which names a directory
                let new_path = if below.as_os_str().is_empty() {
                    to.clone()
                } else {
                    to.join(below)
                };
                state.inodes.remove(&path);
                state.inodes.insert(new_path.clone(), inode);
                state.paths.insert(inode, new_path);
            }
            Ok(())
        });
        reply_or_error!(reply, result, |()| reply.ok());
    }

    fn open(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        reply.opened(0, 0);
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let result = self.state().view(ino, offset as u64, u64::from(size));
        reply_or_error!(reply, result, |bytes: Vec<u8>| reply.data(&bytes));
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let result = self.state().write(ino, offset as u64, data);
        reply_or_error!(reply, result, |()| reply.written(data.len() as u32));
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        reply.ok(); // close() is not fsync(): the data stays volatile
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let result = self.state().fsync(ino);
        reply_or_error!(reply, result, |()| reply.ok());
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        let mut state = self.state();
        let listing = state.path(ino).and_then(|dir| {
            let mut entries = vec![
                (ino, FileType::Directory, ".".into()),
                (ino, FileType::Directory, "..".into()),
            ];
            for entry in std::fs::read_dir(&dir).map_err(|e| errno(&e))? {
                let entry = entry.map_err(|e| errno(&e))?;
                let kind = if entry.file_type().map_err(|e| errno(&e))?.is_dir() {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                entries.push((state.inode(&entry.path()), kind, entry.file_name()));
            }
            Ok(entries)
        });
        match listing {
            Ok(entries) => {
                for (index, (inode, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(inode, index as i64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(code) => reply.error(code),
        }
    }

    fn fsyncdir(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        reply.ok(); // directory entries reach the real directory at once
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.state();
        let result = state.child(parent, name).and_then(|path| {
            let mut options = OpenOptions::new();
            options.read(true).write(true).create(true).mode(mode);
            if flags & libc::O_EXCL != 0 {
                options.create_new(true);
            }
            if flags & libc::O_TRUNC != 0 {
                options.truncate(true);
            }
            let file = options.open(&path).map_err(|e| errno(&e))?;
            let inode = state.inode(&path);
            if flags & libc::O_TRUNC != 0 {
                state.unsynced.remove(&inode);
            }
            state.files.insert(inode, file);
            state.attr(inode)
        });
        reply_or_error!(reply, result, |attr| reply.created(&TTL, &attr, 0, 0, 0));
    }
}
