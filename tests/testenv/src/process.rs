//! Child processes that never outlive the test process.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long [`Process::stop`] waits after SIGTERM. Short, because
/// kube-apiserver and etcd with open watches take ~5 s to exit gracefully,
/// and nothing here needs a graceful exit.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` with PR_SET_PDEATHSIG=SIGKILL, so the kernel kills it when we
/// die, even though `ControlPlane::shared()` is a static that is never dropped.
/// PDEATHSIG fires when the *thread* that forked the child exits, so all
/// children are forked by one dedicated thread that never returns.
fn spawn_orphan_safe(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testenv-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let parent = std::process::id() as libc::pid_t;
                    // SAFETY: only async-signal-safe calls between fork and exec.
                    unsafe {
                        cmd.pre_exec(move || {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            // We may have died before prctl took effect.
                            if libc::getppid() != parent {
                                libc::_exit(1);
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the spawner thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    spawner.lock().unwrap().send((cmd, tx)).expect("spawner thread gone");
    rx.recv().expect("spawner thread gone")
}

/// A running child process whose stdout and stderr go to a log file. It is
/// killed if the test process dies, and stopped (SIGTERM, then SIGKILL) on drop.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Spawns `cmd`, appending its output to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Process> {
        let out = File::options().create(true).append(true).open(log)?;
        cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let child = spawn_orphan_safe(cmd).with_context(|| format!("spawning {name}"))?;
        Ok(Process { name: name.into(), child, log: log.into() })
    }

    /// The child's process id (e.g. to read its memory use from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident and peak resident memory (VmRSS, VmHWM) in KiB; zeros once it has exited.
    pub fn rss_kib(&self) -> (u64, u64) {
        let status = self.status_kib(&["VmRSS:", "VmHWM:"]);
        (status[0], status[1])
    }

    /// Fields of /proc/PID/status in KiB, e.g. `["RssAnon:", "RssFile:"]`, in the order
    /// asked; 0 for a field it lacks, and all zeros once the process has exited.
    pub fn status_kib(&self, fields: &[&str]) -> Vec<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        fields.iter().map(|name| field(name)).collect()
    }

    /// Err (with the log's tail) if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!("{} exited ({status}); {}", self.name, self.log_tail()),
        }
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("last lines of {}:\n{tail}", self.log.display())
    }

    /// Sends SIGTERM (if still running) without waiting; see [`Process::stop`].
    pub fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: plain kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }

    /// SIGSTOP: frozen, as a paused VM or a stalled node would be; [`Process::resume`] ends it.
    pub fn pause(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: plain kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGSTOP) };
        }
    }

    /// SIGCONT.
    pub fn resume(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: as above.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGCONT) };
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`STOP_GRACE`].
    pub fn stop(&mut self) {
        self.terminate();
        // A paused process would hear the SIGTERM only once continued.
        self.resume();
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// SIGKILL, like a crash, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A fresh temp dir named after our pid; dirs of earlier, dead test processes
/// (static control planes are never dropped) are removed on the way.
pub(crate) fn temp_dir(kind: &str) -> Result<tempfile::TempDir> {
    let prefix = "regcred-testenv-";
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) =
                name.strip_prefix(prefix).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            // SAFETY: kill with signal 0 only checks whether the pid exists.
            let dead = unsafe { libc::kill(pid, 0) } != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            if dead {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(tempfile::Builder::new().prefix(&format!("{prefix}{}-{kind}-", std::process::id())).tempdir()?)
}
