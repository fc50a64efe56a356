//! Helpers for the agent's own tests.

/// Runs `f` on a thread of its own in a fresh network namespace, which the kernel removes with
/// everything in it (tables, rules, sets, links) when the thread ends, whatever happens.
pub fn in_fresh_netns(f: impl FnOnce() + Send + 'static) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (a network namespace of its own)");
        return;
    }
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(NEWNET)");
        f()
    })
    .join()
    .expect("test thread panicked");
}
