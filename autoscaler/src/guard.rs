//! The replica guard: `mecha __replica-guard PARENT -- COMMAND [ARGS...]`, a supervisor of one
//! process tree that the [`crate::supervisor`] puts between itself and every replica, so that
//! nothing a replica starts outlives Mecha — not even when Mecha is SIGKILLed.
//!
//! `PR_SET_PDEATHSIG` only reaches Mecha's direct child, and a command like `sh -c "python3
//! app.py; …"` leaves Python as a grandchild: when Mecha dies, the kernel kills `sh`, and Python
//! is re-parented to init and keeps running. The guard closes that gap:
//!
//! - its parent-death signal is SIGTERM (a signal it can act on, unlike SIGKILL), and it is a
//!   child subreaper, so descendants orphaned below it are re-parented to it, not to init;
//! - it runs the command in its own process group (the supervisor made the guard a group
//!   leader, the command inherits the group), so the supervisor's group signals reach the
//!   command and whatever it forked, as before;
//! - when its parent dies, it SIGKILLs every process of its group and every process
//!   re-parented to it, until none is left, then exits; when the command exits it does the
//!   same for what the command left behind, then exits with the command's status (a death by
//!   signal N as status 128 + N, as shells report it).
//!
//! Not covered: a descendant that moves to another process group or session (`setsid`,
//! daemons) *and* whose parent is still alive when the guard cleans up is only found once its
//! parent is gone (it is then re-parented to the guard); and when the guard itself is
//! SIGKILLed, only its process group is killed with it (the supervisor signals the group).

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use rustix::process::{Pid, Signal, WaitOptions};
use tokio::signal::unix::{SignalKind, signal};

/// The hidden subcommand of the `mecha` binary that runs the guard.
pub const SUBCOMMAND: &str = "__replica-guard";

/// Longest the guard keeps killing and reaping before it gives up and exits.
const CLEANUP_LIMIT: Duration = Duration::from_secs(5);

/// The arguments the supervisor passes to the guard program to run `command`.
pub fn args(parent: u32, command: &[OsString]) -> Vec<OsString> {
    let mut args = vec![
        OsString::from(SUBCOMMAND),
        OsString::from(parent.to_string()),
        OsString::from("--"),
    ];
    args.extend(command.iter().cloned());
    args
}

/// Runs the guard if `args` (the whole command line) asks for it; `None` otherwise.
pub async fn from_args(args: &[OsString]) -> Option<ExitCode> {
    if args.get(1).is_none_or(|a| a != SUBCOMMAND) {
        return None;
    }
    let parent = args
        .get(2)
        .and_then(|p| p.to_str())
        .and_then(|p| p.parse::<i32>().ok())
        .and_then(Pid::from_raw);
    let command = args
        .get(4..)
        .filter(|_| args.get(3).is_some_and(|a| a == "--"));
    let (Some(parent), Some(command)) = (parent, command) else {
        say(&format!(
            "usage: mecha {SUBCOMMAND} PARENT_PID -- COMMAND [ARGS...]"
        ));
        return Some(ExitCode::from(2));
    };
    Some(run(parent, command).await)
}

async fn run(parent: Pid, command: &[OsString]) -> ExitCode {
    let Some((program, program_args)) = command.split_first() else {
        say("the container has no command");
        return ExitCode::from(2);
    };
    let me = rustix::process::getpid();
    let prepared = rustix::process::set_child_subreaper(Some(me))
        .and_then(|()| rustix::process::set_parent_process_death_signal(Some(Signal::TERM)));
    if let Err(error) = prepared {
        say(&format!(
            "replica guard: cannot set up process supervision: {error}"
        ));
        return ExitCode::from(1);
    }
    // The parent may have died before the death signal was set: then no signal will come.
    if rustix::process::getppid() != Some(parent) {
        return ExitCode::from(1);
    }
    // Listen before starting the command, so that no stop request can be missed.
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        say("replica guard: cannot listen for signals");
        return ExitCode::from(1);
    };
    let mut child = match tokio::process::Command::new(program)
        .args(program_args)
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            say(&format!(
                "cannot start `{}`: {error}",
                program.to_string_lossy()
            ));
            return ExitCode::from(127);
        }
    };
    let child_pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(Pid::from_raw);
    loop {
        let received = tokio::select! {
            status = child.wait() => {
                // Whatever the command left behind goes with it.
                kill_descendants(me);
                return match status {
                    Ok(status) => exit_code(status),
                    Err(error) => {
                        say(&format!("replica guard: cannot wait for the command: {error}"));
                        ExitCode::from(1)
                    }
                };
            }
            _ = term.recv() => Signal::TERM,
            _ = int.recv() => Signal::INT,
            _ = hup.recv() => Signal::HUP,
        };
        if rustix::process::getppid() != Some(parent) {
            // Mecha is gone (the death signal): nobody will stop this tree but us.
            kill_descendants(me);
            return ExitCode::from(137);
        }
        // A stop from the supervisor signals the whole group, the command included; a command
        // that moved to a group of its own is passed the signal here.
        if let Some(pid) = child_pid
            && rustix::process::getpgid(Some(pid)).is_ok_and(|group| group != me)
        {
            let _ = rustix::process::kill_process(pid, received);
        }
    }
}

/// SIGKILLs every process in the guard's group and every process re-parented to it, and
/// reaps them, until there are none (or [`CLEANUP_LIMIT`] passes).
fn kill_descendants(me: Pid) {
    let deadline = std::time::Instant::now() + CLEANUP_LIMIT;
    loop {
        for pid in members(me) {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
        // Reap whatever died; stop once no child is left.
        loop {
            match rustix::process::wait(WaitOptions::NOHANG) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return, // ECHILD: nothing left
            }
        }
        if std::time::Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Processes in `me`'s process group or whose parent is `me`, except `me`.
fn members(me: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me.as_raw_nonzero().get())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                let (ppid, pgrp) = parent_and_group(&stat);
                ppid == Some(me.as_raw_nonzero().get()) || pgrp == Some(me.as_raw_nonzero().get())
            })
        })
        .filter_map(Pid::from_raw)
        .collect()
}

/// `ppid` and `pgrp` from `/proc/PID/stat`; the command name may hold spaces and parentheses,
/// so fields are counted after its last `)`.
fn parent_and_group(stat: &str) -> (Option<i32>, Option<i32>) {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return (None, None);
    };
    let mut fields = rest.split_whitespace().skip(1); // state
    let ppid = fields.next().and_then(|f| f.parse().ok());
    let pgrp = fields.next().and_then(|f| f.parse().ok());
    (ppid, pgrp)
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Writes to stderr (the replica's log) without panicking when nobody reads it any more.
fn say(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let stat = "4242 (my (odd) name) S 17 4242 4242 0 -1 4194560";
        assert_eq!(parent_and_group(stat), (Some(17), Some(4242)));
        assert_eq!(parent_and_group("garbage"), (None, None));
    }

    #[test]
    fn args_round_trip() {
        let command = [
            OsString::from("sh"),
            OsString::from("-c"),
            OsString::from("x"),
        ];
        let mut all = vec![OsString::from("mecha")];
        all.extend(args(7, &command));
        assert_eq!(all[1], SUBCOMMAND);
        assert_eq!(&all[4..], &command);
    }
}
