//! The mode and ACLs a new object gets in a directory, as the upper filesystem would give them
//! if the object were made in place (POSIX.1e, as Linux's `posix_acl_create`).
//!
//! The kernel's FUSE layer passes the caller's umask untouched (FUSE_DONT_MASK), so the daemon
//! decides: a parent without a default ACL gets the umask applied; a parent with one gets the
//! default ACL instead. Objects made in place in such a parent get it from the upper filesystem;
//! objects built in `work/` (over a whiteout) get the result of [`inherit`] set by hand.
//!
//! Value layout of `system.posix_acl_*` (little-endian): a `u32` version (2), then entries of
//! `u16` tag, `u16` permissions, `u32` id.

/// The xattr holding a directory's default ACL.
pub const DEFAULT_ACL: &str = "system.posix_acl_default";
/// The xattr holding an object's access ACL.
pub const ACCESS_ACL: &str = "system.posix_acl_access";

const VERSION: u32 = 2;
const HEADER: usize = 4;
const ENTRY: usize = 8;

const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// What a new object inherits from its parent's default ACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inherited {
    /// Permission bits to create the object with (the file-type and set-id bits are the caller's).
    pub mode: u32,
    /// The access ACL to set, when the mode bits cannot say it all (named entries or a mask).
    pub access: Option<Vec<u8>>,
    /// The default ACL to set: the parent's, for a directory.
    pub default: Option<Vec<u8>>,
}

/// The permission bits a new object gets from `mode` and the caller's `umask`, with the parent's
/// default ACL `parent_default` (`None`: the parent has none).
pub fn create_mode(mode: u32, umask: u32, parent_default: Option<&[u8]>) -> u32 {
    match parent_default.and_then(|acl| inherit(acl, mode, false)) {
        Some(inh) => (mode & !0o777) | inh.mode,
        None => mode & !(umask & 0o777),
    }
}

/// Applies the default ACL `acl` to a new object of permission bits `mode` (a directory when
/// `is_dir`). `None` when `acl` is malformed: the caller then treats the parent as having none.
pub fn inherit(acl: &[u8], mode: u32, is_dir: bool) -> Option<Inherited> {
    let mut entries = parse(acl)?;
    let mut mode = mode & 0o777;
    let mut extended = false;
    let mut group_obj = None;
    let mut mask = None;
    for (i, (tag, perm)) in entries.iter_mut().enumerate() {
        match *tag {
            USER_OBJ => {
                *perm &= ((mode >> 6) & 0o7) as u16;
                mode &= (u32::from(*perm) << 6) | !0o700;
            }
            USER | GROUP => extended = true,
            GROUP_OBJ => group_obj = Some(i),
            OTHER => {
                *perm &= (mode & 0o7) as u16;
                mode &= u32::from(*perm) | !0o7;
            }
            MASK => {
                mask = Some(i);
                extended = true;
            }
            _ => return None,
        }
    }
    let (_, perm) = &mut entries[mask.or(group_obj)?];
    *perm &= ((mode >> 3) & 0o7) as u16;
    mode &= (u32::from(*perm) << 3) | !0o70;
    let access = extended.then(|| rewrite(acl, &entries));
    Some(Inherited {
        mode,
        access,
        default: is_dir.then(|| acl.to_vec()),
    })
}

/// The (tag, permissions) of each entry of `acl`; `None` when malformed.
fn parse(acl: &[u8]) -> Option<Vec<(u16, u16)>> {
    let (head, body) = acl.split_at_checked(HEADER)?;
    if u32::from_le_bytes(head.try_into().ok()?) != VERSION || body.len() % ENTRY != 0 {
        return None;
    }
    Some(
        body.chunks_exact(ENTRY)
            .map(|e| {
                (
                    u16::from_le_bytes([e[0], e[1]]),
                    u16::from_le_bytes([e[2], e[3]]),
                )
            })
            .collect(),
    )
}

/// `acl` with the permissions of its entries replaced by `entries` (same order, same ids).
fn rewrite(acl: &[u8], entries: &[(u16, u16)]) -> Vec<u8> {
    let mut out = acl.to_vec();
    for (chunk, (_, perm)) in out[HEADER..].chunks_exact_mut(ENTRY).zip(entries) {
        chunk[2..4].copy_from_slice(&perm.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = VERSION.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    const ANY: u32 = u32::MAX;

    #[test]
    fn a_named_user_brings_a_mask_from_the_group_bits() {
        // setfacl -d -m u:1000:rwx on a 0755 dir; touch (0666) → 0664, mask rw-.
        let parent = acl(&[
            (USER_OBJ, 7, ANY),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, ANY),
            (MASK, 7, ANY),
            (OTHER, 5, ANY),
        ]);
        let got = inherit(&parent, 0o666, false).expect("well-formed");
        assert_eq!(got.mode, 0o664);
        let want = acl(&[
            (USER_OBJ, 6, ANY),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, ANY),
            (MASK, 6, ANY),
            (OTHER, 4, ANY),
        ]);
        assert_eq!(got.access, Some(want));
        assert_eq!(got.default, None);
        let dir = inherit(&parent, 0o777, true).expect("well-formed");
        assert_eq!(dir.mode, 0o775);
        assert_eq!(dir.default, Some(parent));
    }

    #[test]
    fn a_minimal_acl_is_only_mode_bits() {
        let parent = acl(&[(USER_OBJ, 7, ANY), (GROUP_OBJ, 0, ANY), (OTHER, 0, ANY)]);
        let got = inherit(&parent, 0o666, false).expect("well-formed");
        assert_eq!((got.mode, got.access), (0o600, None));
    }

    #[test]
    fn the_umask_applies_only_without_a_default_acl() {
        let parent = acl(&[(USER_OBJ, 7, ANY), (GROUP_OBJ, 7, ANY), (OTHER, 7, ANY)]);
        assert_eq!(create_mode(0o100666, 0o027, None), 0o100640);
        assert_eq!(create_mode(0o100666, 0o027, Some(&parent)), 0o100666);
        assert_eq!(create_mode(0o4755, 0o022, None), 0o4755);
    }

    #[test]
    fn malformed_acls_are_refused() {
        for bad in [
            vec![],
            vec![2, 0, 0],
            acl(&[(USER_OBJ, 7, ANY)])[..10].to_vec(),
            acl(&[(USER_OBJ, 7, ANY), (0x40, 7, ANY)]),
            acl(&[(USER_OBJ, 7, ANY), (OTHER, 7, ANY)]),
            {
                let mut v = acl(&[(USER_OBJ, 7, ANY)]);
                v[0] = 1;
                v
            },
        ] {
            assert_eq!(inherit(&bad, 0o666, false), None, "{bad:?}");
        }
    }
}
