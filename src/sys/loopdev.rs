//! Loop devices and their backing files: the loop driver reads its backing file from inside the
//! kernel, with no pre-content event, so a stub attached to one must be complete (see `worker`,
//! which fetches a stub whole when `losetup` or `mount` opens it). `hsm status` uses this to say
//! which stubs are attached.

use std::io;
use std::os::fd::AsRawFd;

const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;

/// `struct loop_info64` (include/uapi/linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// Every attached loop device, as `(device path, backing file's device, backing file's inode)`.
pub fn attached() -> io::Result<Vec<(String, u64, u64)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/sys/block")? {
        let name = entry?.file_name().to_string_lossy().to_string();
        if !name.starts_with("loop") {
            continue;
        }
        // Only attached devices have a backing file.
        if !std::path::Path::new(&format!("/sys/block/{name}/loop/backing_file")).exists() {
            continue;
        }
        let dev = format!("/dev/{name}");
        let Ok(f) = std::fs::File::open(&dev) else {
            continue;
        };
        // SAFETY: LoopInfo64 is plain data; the ioctl fills it.
        let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
        // SAFETY: LOOP_GET_STATUS64 writes one loop_info64 into `info`.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_GET_STATUS64, &mut info) };
        if r == 0 {
            out.push((dev, info.lo_device, info.lo_inode));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn loop_info64_has_the_kernels_size() {
        // 8 * 5 + 4 * 4 + 64 + 64 + 32 + 16 = 232 bytes.
        assert_eq!(std::mem::size_of::<super::LoopInfo64>(), 232);
    }
}
