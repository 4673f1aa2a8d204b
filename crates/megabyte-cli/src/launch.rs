//! `megabyte train --devices LIST`: the multi-GPU launcher. It starts one worker per GPU, each
//! this same command with `--device cuda:N` and RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
//! (127.0.0.1) and MASTER_PORT (a free port) set, as torchrun would, and watches them: when one
//! fails, it stops the others and names the rank. Ctrl-C is passed on to every worker (which
//! agree to stop after the same step and save); the workers run in their own process group,
//! so the terminal's Ctrl-C reaches them only through here, once.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a worker has to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(10);

/// Starts and supervises one worker per GPU of `devices` (`all` or `0,1,…`). `device` is the
/// `--device` given with it, if any.
pub fn run(devices: &str, device: Option<&str>) -> Result<()> {
    match device.map(str::trim) {
        None | Some("cuda") => {}
        Some("cpu") => bail!("--devices trains on CUDA GPUs: drop --device cpu"),
        Some(other) => bail!("--devices chooses the GPUs itself: drop --device {other}"),
    }
    let count = megabyte::gpu::cuda_device_count().context("--devices")?;
    let gpus = parse_devices(devices, count)?;
    if megabyte::dist::DistEnv::from_env()?.is_some() {
        bail!("--devices starts its own workers: unset WORLD_SIZE and RANK, or drop --devices to run as one rank of a job");
    }
    let port = free_port()?;
    let exe = std::env::current_exe().context("finding the megabyte executable to start the workers")?;
    let args = worker_args(std::env::args_os().skip(1));
    let world = gpus.len();
    eprintln!("launching {world} workers on GPUs {gpus:?} (rendezvous at 127.0.0.1:{port})");
    let workers = gpus
        .iter()
        .enumerate()
        .map(|(rank, gpu)| {
            let mut cmd = Command::new(&exe);
            cmd.args(&args)
                .arg("--device")
                .arg(format!("cuda:{gpu}"))
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string());
            (format!("rank {rank} (GPU {gpu})"), cmd)
        })
        .collect();
    let interrupts = Arc::new(AtomicUsize::new(0));
    {
        let interrupts = interrupts.clone();
        ctrlc::set_handler(move || {
            interrupts.fetch_add(1, Ordering::SeqCst);
        })
        .context("installing the Ctrl-C handler")?;
    }
    supervise(workers, &interrupts, GRACE)
}

/// GPU numbers from `all` or a comma-separated list, checked against the `count` visible.
pub fn parse_devices(list: &str, count: usize) -> Result<Vec<usize>> {
    let list = list.trim();
    let gpus: Vec<usize> = if list == "all" {
        (0..count).collect()
    } else {
        list.split(',')
            .map(|s| s.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| anyhow::anyhow!("--devices {list:?}: give GPU numbers separated by commas (0,1) or all"))?
    };
    if gpus.is_empty() {
        bail!("--devices {list:?}: no CUDA GPU is visible to this process");
    }
    for (i, g) in gpus.iter().enumerate() {
        if *g >= count {
            bail!("--devices {list:?}: there is no GPU {g}; this host shows {count} (0 to {})", count.saturating_sub(1));
        }
        if gpus[..i].contains(g) {
            bail!("--devices {list:?}: GPU {g} is listed twice; one worker per GPU");
        }
    }
    Ok(gpus)
}

/// This command's arguments without `--devices` and `--device` (each worker gets its own).
fn worker_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for arg in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        let s = arg.to_string_lossy();
        if s == "--devices" || s == "--device" {
            skip_value = true;
        } else if !(s.starts_with("--devices=") || s.starts_with("--device=")) {
            out.push(arg);
        }
    }
    out
}

/// A TCP port free on 127.0.0.1 right now, for the workers' rendezvous.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port for the rendezvous")?;
    Ok(listener.local_addr()?.port())
}

/// Starts the `workers` (name, command), passes each new Ctrl-C counted in `interrupts` on to
/// them as SIGINT, and waits: Ok when all exit successfully. When one fails, the others get
/// SIGTERM (SIGKILL after `grace`) and the error names the worker and how it ended.
pub fn supervise(workers: Vec<(String, Command)>, interrupts: &AtomicUsize, grace: Duration) -> Result<()> {
    let mut running: Vec<(String, Child)> = Vec::with_capacity(workers.len());
    for (name, mut cmd) in workers {
        let parent = std::process::id();
        cmd.process_group(0);
        // SAFETY: prctl and getppid are async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(move || {
                // A worker dies with the launcher, so none is left behind holding a GPU.
                #[cfg(target_os = "linux")]
                {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    if libc::getppid() as u32 != parent {
                        libc::_exit(1);
                    }
                }
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(child) => running.push((name, child)),
            Err(e) => {
                stop_all(&mut running, grace);
                bail!("cannot start {name}: {e}");
            }
        }
    }
    let mut forwarded = 0;
    let mut done = vec![false; running.len()];
    loop {
        let asked = interrupts.load(Ordering::SeqCst);
        while forwarded < asked {
            for (i, (_, child)) in running.iter().enumerate() {
                if !done[i] {
                    signal(child, libc::SIGINT);
                }
            }
            forwarded += 1;
        }
        for i in 0..running.len() {
            if done[i] {
                continue;
            }
            let status = running[i].1.try_wait().with_context(|| format!("waiting for {}", running[i].0))?;
            let Some(status) = status else { continue };
            done[i] = true;
            if !status.success() {
                let name = running[i].0.clone();
                let started = Instant::now();
                stop_all(&mut running, grace);
                let how = describe(status);
                if forwarded >= 2 {
                    bail!("interrupted twice: {name} {how}; stopped the other workers without a final checkpoint");
                }
                bail!(
                    "{name} {how}; stopped the other workers in {:.1} s (the newest checkpoint in the run folder is intact)",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        if done.iter().all(|&d| d) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: sends a signal to our own child, which has not been reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// SIGTERM to every worker still running, SIGKILL to those left after `grace`, and reaps all.
fn stop_all(running: &mut [(String, Child)], grace: Duration) {
    for (_, child) in running.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            signal(child, libc::SIGTERM);
            // A stopped worker (SIGSTOP, Ctrl-Z) acts on SIGTERM only once continued.
            signal(child, libc::SIGCONT);
        }
    }
    let deadline = Instant::now() + grace;
    for (_, child) in running.iter_mut() {
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// "exited with status 3", "was killed by signal 9 (SIGKILL)".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => {
            let name = match sig {
                libc::SIGKILL => " (SIGKILL: out of memory?)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGINT => " (SIGINT)",
                libc::SIGBUS => " (SIGBUS)",
                _ => "",
            };
            format!("was killed by signal {sig}{name}")
        }
        _ => format!("ended ({status})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn a_failing_worker_stops_the_others_and_is_named() {
        let started = Instant::now();
        let workers = vec![
            ("rank 0 (GPU 0)".to_string(), sh("sleep 60")),
            ("rank 1 (GPU 1)".to_string(), sh("sleep 0.3; exit 3")),
            ("rank 2 (GPU 2)".to_string(), sh("trap '' TERM; sleep 60")), // ignores SIGTERM
        ];
        let err = supervise(workers, &AtomicUsize::new(0), Duration::from_secs(2)).unwrap_err().to_string();
        assert!(err.contains("rank 1 (GPU 1) exited with status 3"), "{err}");
        // SIGTERM ends rank 0 at once; rank 2 is killed after the 2 s grace.
        let secs = started.elapsed().as_secs_f64();
        assert!(secs < 10.0, "took {secs} s");
    }

    #[test]
    fn a_stopped_worker_is_stopped_without_waiting_out_the_grace() {
        // Rank 0 stops itself (as under SIGSTOP); SIGTERM alone would wait until SIGKILL.
        let started = Instant::now();
        let workers = vec![("rank 0".to_string(), sh("kill -STOP $$; sleep 60")), ("rank 1".to_string(), sh("sleep 0.5; exit 3"))];
        let err = supervise(workers, &AtomicUsize::new(0), Duration::from_secs(20)).unwrap_err().to_string();
        assert!(err.contains("rank 1 exited with status 3"), "{err}");
        let secs = started.elapsed().as_secs_f64();
        assert!(secs < 10.0, "took {secs} s: the stopped worker waited for SIGKILL");
    }

    #[test]
    fn a_killed_worker_is_reported_with_its_signal() {
        let workers = vec![("rank 0 (GPU 0)".to_string(), sh("sleep 60")), ("rank 1 (GPU 3)".to_string(), sh("kill -9 $$"))];
        let err = supervise(workers, &AtomicUsize::new(0), Duration::from_secs(2)).unwrap_err().to_string();
        assert!(err.contains("rank 1 (GPU 3) was killed by signal 9"), "{err}");
    }

    #[test]
    fn workers_that_succeed_end_the_launch_successfully() {
        let workers = vec![("rank 0".to_string(), sh("sleep 0.2")), ("rank 1".to_string(), sh("true"))];
        supervise(workers, &AtomicUsize::new(0), Duration::from_secs(2)).unwrap();
    }

    #[test]
    fn ctrl_c_reaches_every_worker_once() {
        // Each worker exits 0 on its first SIGINT (as a worker saves and stops); a second
        // would make it exit 7.
        let script = "n=0; trap 'n=$((n+1)); [ $n -gt 1 ] && exit 7' INT; while [ $n -eq 0 ]; do sleep 0.05; done; sleep 0.5; exit 0";
        let workers = vec![("rank 0".to_string(), sh(script)), ("rank 1".to_string(), sh(script))];
        let interrupts = Arc::new(AtomicUsize::new(0));
        let i = interrupts.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            i.fetch_add(1, Ordering::SeqCst);
        });
        supervise(workers, &interrupts, Duration::from_secs(2)).unwrap();
    }

    #[test]
    fn device_lists_are_checked() {
        assert_eq!(parse_devices("all", 3).unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_devices(" 2, 0 ", 4).unwrap(), vec![2, 0]);
        for (list, count, says) in [
            ("0,1", 1, "there is no GPU 1"),
            ("0,0", 2, "listed twice"),
            ("a,b", 2, "separated by commas"),
            ("", 2, "separated by commas"),
            ("all", 0, "no CUDA GPU"),
        ] {
            let err = parse_devices(list, count).unwrap_err().to_string();
            assert!(err.contains(says), "{list}: {err}");
        }
    }

    #[test]
    fn workers_get_the_arguments_without_the_device_options() {
        let args = ["train", "--devices", "0,1", "--out", "r", "--device=cuda", "--steps", "5", "--device", "cuda", "--devices=all"];
        let out = worker_args(args.iter().map(OsString::from));
        assert_eq!(out, ["train", "--out", "r", "--steps", "5"].map(OsString::from));
    }
}
