//! Who is calling on the Workload API socket, as selectors: the kernel's
//! peer credentials of the connection (`SO_PEERCRED`: uid, gid, pid) give
//! `unix:uid:<n>` and `unix:gid:<n>`, and the caller's executable
//! (`/proc/<pid>/exe`) gives `unix:path:<exe>`.
//!
//! Limits, as in every peer-credential attestor: the credentials are those
//! of the process that opened the connection; the executable is read when
//! the call arrives (a pid reused in between would be misread, which needs
//! the caller to exit and a new process to take its pid within that window);
//! an executable deleted since it started yields no path selector; reading
//! another user's `/proc/<pid>/exe` needs the agent to run as that user or
//! as root, otherwise the path selector is simply absent, so entries that
//! require one never match (fail closed).

use std::path::PathBuf;

/// The selectors of a caller.
pub fn of_peer(uid: u32, gid: u32, pid: Option<i32>) -> Vec<String> {
    let mut out = vec![format!("unix:uid:{uid}"), format!("unix:gid:{gid}")];
    if let Some(exe) = pid.filter(|p| *p > 0).and_then(exe_path) {
        out.push(format!("unix:path:{exe}"));
    }
    out
}

/// The executable of `pid`, if readable, still on disk and UTF-8.
fn exe_path(pid: i32) -> Option<String> {
    let p: PathBuf = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let s = p.to_str()?;
    if s.ends_with(" (deleted)") || !s.starts_with('/') {
        return None;
    }
    Some(s.to_owned())
}

/// True when every one of `required` is among `observed` (an empty
/// `required` never matches: an entry must select something).
pub fn all_present(required: &[String], observed: &[String]) -> bool {
    !required.is_empty() && required.iter().all(|r| observed.contains(r))
}

/// True when any of `allowed` is among `observed`.
pub fn any_present(allowed: &[String], observed: &[String]) -> bool {
    allowed.iter().any(|a| observed.contains(a))
}

/// The uid the agent runs as (owner of `/proc/self`).
pub fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_uid_gid_and_path_selectors() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let uid = own_uid().unwrap();
        let s = of_peer(uid, 7, Some(pid));
        assert_eq!(s[0], format!("unix:uid:{uid}"));
        assert_eq!(s[1], "unix:gid:7");
        let exe = std::env::current_exe().unwrap();
        assert_eq!(s[2], format!("unix:path:{}", exe.display()));
        assert_eq!(of_peer(1, 2, None).len(), 2);
    }

    #[test]
    fn matching() {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let observed = v(&["unix:uid:1", "unix:gid:2"]);
        assert!(all_present(&v(&["unix:uid:1"]), &observed));
        assert!(!all_present(&v(&["unix:uid:1", "unix:path:/x"]), &observed));
        assert!(!all_present(&[], &observed));
        assert!(any_present(&v(&["unix:uid:9", "unix:gid:2"]), &observed));
        assert!(!any_present(&[], &observed));
    }
}
