//! Process-wide settings made once at start, before the async runtime's threads exist:
//! the allocator's tuning and the open-files limit.

/// `mi_option_purge_delay` in `mimalloc.h`: how many milliseconds freed memory is kept
/// before it goes back to the OS (1,000 by default in mimalloc 3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// `mi_option_allow_thp` in `mimalloc.h`: whether mimalloc asks for transparent huge
/// pages (`madvise(MADV_HUGEPAGE)`) on the memory it maps.
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Memory is returned to the OS as soon as it is freed: with a delay, pages freed by
/// threads that then go quiet (a search-index merge, a burst of requests) stay resident.
///
/// And the process does without transparent huge pages, which mimalloc asks for: in
/// 2 MiB pages one live object keeps a whole page resident. The system setting stays as
/// it is for other processes. (Measurements: `docs/BENCHMARKS.md`, "The allocator" and
/// "Transparent huge pages".)
pub fn configure_allocator() {
    // SAFETY: sets plain integer options of the allocator; any value is valid.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0);
    }
    // SAFETY: PR_SET_THP_DISABLE takes an integer flag and no pointers. It also covers
    // regions mapped before the call (pages already huge stay so). A kernel without it
    // (before 3.15) returns an error, which leaves huge pages as the system has them.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// The open-files limit after [`raise_open_files_limit`]: soft and hard, or why it
/// could not be read or raised.
pub type OpenFiles = Result<(u64, u64), std::io::Error>;

/// Raises the soft limit on open files (RLIMIT_NOFILE) to the hard one. Every client
/// connection takes a descriptor, and the soft limit (often 1,024) would otherwise
/// stop the server far below MAX_CONNECTIONS. Raising the soft limit up to the hard
/// one needs no privilege. A failure leaves the limit as it was.
pub fn raise_open_files_limit() -> OpenFiles {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a pointer to a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one `rlimit` through a pointer to a live local.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the options are process-wide, and the defaults must be read before
    // anything configures them.
    #[test]
    fn the_allocator_returns_memory_at_once_and_without_huge_pages() {
        // SAFETY: reads and sets integer options of the allocator, and a process flag.
        let option = |o| unsafe { libmimalloc_sys::mi_option_get(o) };
        // The defaults of mimalloc 3 identify the options the constants name.
        assert_eq!(option(MI_OPTION_PURGE_DELAY), 1000, "purge_delay");
        assert_eq!(option(MI_OPTION_ALLOW_THP), 1, "allow_thp");
        configure_allocator();
        assert_eq!(option(MI_OPTION_PURGE_DELAY), 0);
        assert_eq!(option(MI_OPTION_ALLOW_THP), 0);
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(disabled, 1);
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let (soft, hard) = raise_open_files_limit().expect("getrlimit and setrlimit");
        assert_eq!(soft, hard);
    }
}
