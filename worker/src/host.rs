//! What the machine offers this worker: its host name, and the memory it has and may still use,
//! which sizes the KV cache of a CPU rank when the coordinator is not told how much to use.
//!
//! In a container the host's `MemAvailable` is not the answer: Kubernetes' `limits.memory` is a
//! cgroup limit, and a worker that sized its cache from the host's figure would be OOM-killed.
//! So the figure is the host's available memory capped by the tightest cgroup headroom (limit
//! less working set) on the worker's cgroup path, cgroup v2 or v1.

use std::{
    fs,
    path::{Path, PathBuf},
};

use caravan_ops::MemoryInfo;

/// The kernel's host name.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Bytes this process may still allocate (0 when unknown).
pub fn available_memory() -> u64 {
    memory().free
}

/// The host's memory as this process sees it: `total` is `MemTotal` capped by the tightest
/// cgroup limit, `free` the available memory capped by the tightest cgroup headroom (0 when
/// unknown).
pub fn memory() -> MemoryInfo {
    memory_under(Path::new("/proc"), Path::new("/sys/fs/cgroup"))
}

/// [`available_memory`] with `/proc` and `/sys/fs/cgroup` elsewhere (for tests).
pub fn available_memory_under(proc_root: &Path, cgroup_root: &Path) -> u64 {
    memory_under(proc_root, cgroup_root).free
}

/// [`memory`] with `/proc` and `/sys/fs/cgroup` elsewhere (for tests).
pub fn memory_under(proc_root: &Path, cgroup_root: &Path) -> MemoryInfo {
    let meminfo = fs::read_to_string(proc_root.join("meminfo")).unwrap_or_default();
    let membership = fs::read_to_string(proc_root.join("self/cgroup")).unwrap_or_default();
    let cgroup = cgroup_limits(&membership, cgroup_root);
    let capped = |host: Option<u64>, cgroup: Option<u64>| match (host, cgroup) {
        (Some(h), Some(c)) => h.min(c),
        (h, c) => h.or(c).unwrap_or(0),
    };
    MemoryInfo {
        free: capped(
            meminfo_field(&meminfo, "MemAvailable:"),
            cgroup.map(|c| c.headroom),
        ),
        total: capped(
            meminfo_field(&meminfo, "MemTotal:"),
            cgroup.map(|c| c.limit),
        ),
    }
}

/// A field of `/proc/meminfo`, in bytes.
fn meminfo_field(meminfo: &str, name: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The tightest memory limit of the cgroups a process is in, and the tightest headroom.
#[derive(Debug, Clone, Copy)]
struct CgroupLimits {
    limit: u64,
    headroom: u64,
}

/// The files of one cgroup version's memory controller.
struct MemoryFiles {
    limit: &'static str,
    usage: &'static str,
    /// The `memory.stat` entry for reclaimable page cache, left out of the working set.
    inactive_file: &'static str,
}

const V2: MemoryFiles = MemoryFiles {
    limit: "memory.max",
    usage: "memory.current",
    inactive_file: "inactive_file",
};

const V1: MemoryFiles = MemoryFiles {
    limit: "memory.limit_in_bytes",
    usage: "memory.usage_in_bytes",
    inactive_file: "total_inactive_file",
};

/// The smallest limit and the smallest headroom of any memory-limited cgroup from the process's
/// own up to the root, given `/proc/self/cgroup` (`membership`); `None` when nothing is limited.
fn cgroup_limits(membership: &str, root: &Path) -> Option<CgroupLimits> {
    let mut tightest: Option<CgroupLimits> = None;
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (mounts, files): (Vec<PathBuf>, &MemoryFiles) = if controllers.is_empty() {
            (vec![root.to_path_buf(), root.join("unified")], &V2)
        } else if controllers.split(',').any(|c| c == "memory") {
            (vec![root.join("memory")], &V1)
        } else {
            continue;
        };
        let relative = path.trim().trim_start_matches('/');
        for mount in mounts {
            let mut dir = mount.join(relative);
            loop {
                if let Some(c) = limits(&dir, files) {
                    tightest = Some(match tightest {
                        None => c,
                        Some(t) => CgroupLimits {
                            limit: t.limit.min(c.limit),
                            headroom: t.headroom.min(c.headroom),
                        },
                    });
                }
                if dir == mount || !dir.pop() {
                    break;
                }
            }
        }
    }
    tightest
}

/// The limit of the cgroup at `dir`, and its headroom (limit less working set), if it has a
/// memory limit.
fn limits(dir: &Path, files: &MemoryFiles) -> Option<CgroupLimits> {
    let limit = fs::read_to_string(dir.join(files.limit)).ok()?;
    let limit: u64 = limit.trim().parse().ok()?; // v2 writes "max" for no limit
    if limit >= 1 << 60 {
        return None; // v1's "no limit" is just under 2^63
    }
    let usage: u64 = fs::read_to_string(dir.join(files.usage))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let inactive: u64 = fs::read_to_string(dir.join("memory.stat"))
        .ok()
        .and_then(|stat| {
            stat.lines().find_map(|l| {
                let (key, value) = l.split_once(' ')?;
                (key == files.inactive_file).then(|| value.trim().parse().ok())?
            })
        })
        .unwrap_or(0);
    Some(CgroupLimits {
        limit,
        headroom: limit.saturating_sub(usage.saturating_sub(inactive)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn host(proc: &Path, available_gib: u64, membership: &str) {
        write(
            &proc.join("meminfo"),
            &format!(
                "MemTotal:       {} kB\nMemAvailable:   {} kB\n",
                64 * GIB / 1024,
                available_gib * GIB / 1024
            ),
        );
        write(&proc.join("self/cgroup"), membership);
    }

    #[test]
    fn no_cgroup_limit_means_the_hosts_available_memory() {
        let t = tempfile::tempdir().unwrap();
        let (proc, cg) = (t.path().join("proc"), t.path().join("cgroup"));
        host(&proc, 20, "0::/user.slice\n");
        write(&cg.join("user.slice/memory.max"), "max\n");
        write(&cg.join("user.slice/memory.current"), &format!("{}\n", GIB));
        assert_eq!(available_memory_under(&proc, &cg), 20 * GIB);
        assert_eq!(memory_under(&proc, &cg).total, 64 * GIB);
    }

    #[test]
    fn a_v2_limit_caps_it_at_the_limit_less_the_working_set() {
        let t = tempfile::tempdir().unwrap();
        let (proc, cg) = (t.path().join("proc"), t.path().join("cgroup"));
        // Kubernetes with a cgroup namespace: the pod's cgroup is the root of the mount.
        host(&proc, 20, "0::/\n");
        write(&cg.join("memory.max"), &format!("{}\n", 8 * GIB));
        write(&cg.join("memory.current"), &format!("{}\n", 3 * GIB));
        write(
            &cg.join("memory.stat"),
            &format!("anon 1\ninactive_file {}\n", GIB),
        );
        assert_eq!(available_memory_under(&proc, &cg), 6 * GIB);
        // And the total the process can have is the limit, not the host's 64 GiB.
        assert_eq!(memory_under(&proc, &cg).total, 8 * GIB);
    }

    #[test]
    fn the_tightest_ancestor_counts() {
        let t = tempfile::tempdir().unwrap();
        let (proc, cg) = (t.path().join("proc"), t.path().join("cgroup"));
        host(&proc, 20, "0::/kubepods/pod1/worker\n");
        write(&cg.join("kubepods/memory.max"), &format!("{}\n", 4 * GIB));
        write(&cg.join("kubepods/memory.current"), "0\n");
        write(&cg.join("kubepods/pod1/worker/memory.max"), "max\n");
        write(&cg.join("kubepods/pod1/worker/memory.current"), "0\n");
        assert_eq!(available_memory_under(&proc, &cg), 4 * GIB);
    }

    #[test]
    fn a_v1_limit_counts_and_v1s_unlimited_does_not() {
        let t = tempfile::tempdir().unwrap();
        let (proc, cg) = (t.path().join("proc"), t.path().join("cgroup"));
        host(&proc, 20, "5:cpu,cpuacct:/x\n4:memory:/docker/abc\n0::/\n");
        write(
            &cg.join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        );
        write(&cg.join("memory/memory.usage_in_bytes"), "0\n");
        write(
            &cg.join("memory/docker/abc/memory.limit_in_bytes"),
            &format!("{}\n", 2 * GIB),
        );
        write(
            &cg.join("memory/docker/abc/memory.usage_in_bytes"),
            &format!("{}\n", GIB),
        );
        write(
            &cg.join("memory/docker/abc/memory.stat"),
            &format!("total_inactive_file {}\n", GIB / 2),
        );
        assert_eq!(available_memory_under(&proc, &cg), 2 * GIB - GIB / 2);
    }

    #[test]
    fn a_limit_tighter_than_the_host_never_raises_it() {
        let t = tempfile::tempdir().unwrap();
        let (proc, cg) = (t.path().join("proc"), t.path().join("cgroup"));
        host(&proc, 2, "0::/\n");
        write(&cg.join("memory.max"), &format!("{}\n", 8 * GIB));
        write(&cg.join("memory.current"), "0\n");
        assert_eq!(available_memory_under(&proc, &cg), 2 * GIB);
    }
}
