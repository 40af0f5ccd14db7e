//! Group names to ids (`getgrnam_r`).

use std::ffi::CString;
use std::io;

/// The id of group `name` (a number is taken as the id itself).
pub fn group_id(name: &str) -> io::Result<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: group is plain data; getgrnam_r writes into it and into `buf` (of the length
        // passed), and `result` points to it or is NULL.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut group,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 22 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no group named {name}"),
            ));
        }
        return Ok(group.gr_gid);
    }
}

/// This process's effective uid.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail and has no memory effects.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_group_and_numbers() {
        assert_eq!(super::group_id("root").unwrap(), 0);
        assert_eq!(super::group_id("4242").unwrap(), 4242);
        assert!(super::group_id("no-such-group-hsm").is_err());
    }
}
