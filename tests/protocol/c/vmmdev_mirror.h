/*
 * C mirror of the structs the uapi headers do not export, for the gcc ABI test.
 *
 * Written for vbox-agent from the facts in the project's reference notes
 * (linux-vboxguest.md sections 2, 5.2, 10.4 and 18): member names, types, offsets and
 * the sizes the mainline driver (drivers/virt/vboxguest/vmmdev.h, VMMDEV_ASSERT_SIZE) and
 * Oracle's headers (AssertCompileSize) assert. It is not a copy of either header.
 *
 * Two origins:
 *   - "vmmdev": private to the mainline driver. Naturally aligned except the heartbeat
 *     request, which upstream packs to 4 bytes (a u64 at 24 followed by a byte at 32,
 *     size 36), so it is packed here as in the driver.
 *   - "oracle": only in Oracle's out-of-tree driver and VMMDev headers (the
 *     CHANGE_BALLOON ioctl, GET_HOST_TIME, GET_SESSION_ID and the two CPU hot-plug
 *     requests). Layouts are those of 64-bit userspace.
 */
#ifndef VBOX_AGENT_TEST_VMMDEV_MIRROR_H
#define VBOX_AGENT_TEST_VMMDEV_MIRROR_H

#include <linux/ioctl.h>
#include <linux/types.h>
#include <linux/vbox_vmmdev_types.h>
#include <linux/vboxguest.h>

#define MIRROR_ASSERT_SIZE(name, bytes) \
	_Static_assert(sizeof(struct name) == (bytes), "sizeof(struct " #name ") != " #bytes)

/* ---- driver-private (vmmdev.h) --------------------------------------------------- */

struct vmmdev_request_header {
	__u32 size;
	__u32 version;
	enum vmmdev_request_type request_type;
	__s32 rc;
	__u32 reserved1;
	__u32 requestor;
};
MIRROR_ASSERT_SIZE(vmmdev_request_header, 24);

struct vmmdev_host_version {
	struct vmmdev_request_header header;
	__u16 major;
	__u16 minor;
	__u32 build;
	__u32 revision;
	__u32 features;
};
MIRROR_ASSERT_SIZE(vmmdev_host_version, 24 + 16);

struct vmmdev_mask {
	struct vmmdev_request_header header;
	__u32 or_mask;
	__u32 not_mask;
};
MIRROR_ASSERT_SIZE(vmmdev_mask, 24 + 8);

struct vmmdev_events {
	struct vmmdev_request_header header;
	__u32 events;
};
MIRROR_ASSERT_SIZE(vmmdev_events, 24 + 4);

struct vmmdev_guest_info {
	struct vmmdev_request_header header;
	__u32 interface_version;
	__u32 os_type;
};
MIRROR_ASSERT_SIZE(vmmdev_guest_info, 24 + 8);

struct vmmdev_guest_info2 {
	struct vmmdev_request_header header;
	__u16 additions_major;
	__u16 additions_minor;
	__u32 additions_build;
	__u32 additions_revision;
	__u32 additions_features;
	char name[128];
};
MIRROR_ASSERT_SIZE(vmmdev_guest_info2, 24 + 144);

struct vmmdev_guest_status {
	struct vmmdev_request_header header;
	__u32 facility;
	__u32 status;
	__u32 flags;
};
MIRROR_ASSERT_SIZE(vmmdev_guest_status, 24 + 12);

struct vmmdev_memballoon_info {
	struct vmmdev_request_header header;
	__u32 balloon_chunks;
	__u32 phys_mem_chunks;
	__u32 event_ack;
};
MIRROR_ASSERT_SIZE(vmmdev_memballoon_info, 24 + 12);

struct vmmdev_memballoon_change {
	struct vmmdev_request_header header;
	__u32 pages;
	__u32 inflate;
	__u64 phys_page[256];
};
MIRROR_ASSERT_SIZE(vmmdev_memballoon_change, 24 + 8 + 256 * 8);

struct vmmdev_write_core_dump {
	struct vmmdev_request_header header;
	__u32 flags;
};
MIRROR_ASSERT_SIZE(vmmdev_write_core_dump, 24 + 4);

struct vmmdev_heartbeat {
	struct vmmdev_request_header header;
	__u64 interval_ns;
	__u8 enabled;
	__u8 padding[3];
} __attribute__((packed));
MIRROR_ASSERT_SIZE(vmmdev_heartbeat, 24 + 12);

struct vmmdev_hgcmreq_header {
	struct vmmdev_request_header header;
	__u32 flags;
	__s32 result;
};
MIRROR_ASSERT_SIZE(vmmdev_hgcmreq_header, 24 + 8);

struct vmmdev_hgcm_connect {
	struct vmmdev_hgcmreq_header header;
	struct vmmdev_hgcm_service_location loc;
	__u32 client_id;
};
MIRROR_ASSERT_SIZE(vmmdev_hgcm_connect, 32 + 132 + 4);

struct vmmdev_hgcm_disconnect {
	struct vmmdev_hgcmreq_header header;
	__u32 client_id;
};
MIRROR_ASSERT_SIZE(vmmdev_hgcm_disconnect, 32 + 4);

/* The parameters (12 or 16 bytes each) follow the 44-byte call header. */
struct vmmdev_hgcm_call {
	struct vmmdev_hgcmreq_header header;
	__u32 client_id;
	__u32 function;
	__u32 parm_count;
};
MIRROR_ASSERT_SIZE(vmmdev_hgcm_call, 32 + 12);

struct vmmdev_hgcm_cancel2 {
	struct vmmdev_request_header header;
	__u32 phys_req_to_cancel;
};
MIRROR_ASSERT_SIZE(vmmdev_hgcm_cancel2, 24 + 4);

/* ---- Oracle only (VBoxGuest.h, VMMDev.h) ------------------------------------------ */

/* VBGLIOCCHANGEBALLOON, 64-bit userspace: chunk pointer, 7 MBZ bytes, inflate flag. */
struct vbg_ioctl_change_balloon {
	struct vbg_ioctl_hdr hdr;
	union {
		struct {
			__u64 chunk_address;
			__u8 padding[7];
			__u8 inflate;
		} in;
	} u;
};
MIRROR_ASSERT_SIZE(vbg_ioctl_change_balloon, 24 + 16);

#define VBGL_IOCTL_CHANGE_BALLOON \
	_IOC(_IOC_READ | _IOC_WRITE, 'V', 18, 40)
_Static_assert(sizeof(struct vbg_ioctl_change_balloon) == 40, "CHANGE_BALLOON size is 40");

/* VMMDevReqHostTime: host UTC in milliseconds since the Unix epoch. */
struct vmmdev_host_time {
	struct vmmdev_request_header header;
	__u64 time;
};
MIRROR_ASSERT_SIZE(vmmdev_host_time, 24 + 8);

/* VMMDevReqSessionId. */
struct vmmdev_session_id {
	struct vmmdev_request_header header;
	__u64 session_id;
};
MIRROR_ASSERT_SIZE(vmmdev_session_id, 24 + 8);

/* VMMDevCpuHotPlugStatusRequest: a VMMDevCpuStatusType (a 32-bit enum) after the header. */
struct vmmdev_cpu_hotplug_status {
	struct vmmdev_request_header header;
	__u32 status;
};
MIRROR_ASSERT_SIZE(vmmdev_cpu_hotplug_status, 24 + 4);

/* VMMDevGetCpuHotPlugRequest: a VMMDevCpuEventType, the core id, the package id. */
struct vmmdev_cpu_hotplug_request {
	struct vmmdev_request_header header;
	__u32 event_type;
	__u32 core;
	__u32 package;
};
MIRROR_ASSERT_SIZE(vmmdev_cpu_hotplug_request, 24 + 4 + 4 + 4);

/* VMMDevGetStatisticsChangeRequest. */
struct vmmdev_statistics_change {
	struct vmmdev_request_header header;
	__u32 stat_interval;
	__u32 event_ack;
};
MIRROR_ASSERT_SIZE(vmmdev_statistics_change, 24 + 8);

/* VMMDevReportGuestStats: VBoxGuestStatistics (19 u32) after the header. */
struct vmmdev_guest_stats {
	struct vmmdev_request_header header;
	struct {
		__u32 cpu_id;
		__u32 stat_caps;
		__u32 cpu_load_idle;
		__u32 cpu_load_kernel;
		__u32 cpu_load_user;
		__u32 threads;
		__u32 processes;
		__u32 handles;
		__u32 memory_load;
		__u32 page_size;
		__u32 phys_mem_total;
		__u32 phys_mem_avail;
		__u32 phys_mem_balloon;
		__u32 mem_commit_total;
		__u32 mem_kernel_total;
		__u32 mem_kernel_paged;
		__u32 mem_kernel_nonpaged;
		__u32 mem_system_cache;
		__u32 page_file_size;
	} stats;
};
MIRROR_ASSERT_SIZE(vmmdev_guest_stats, 24 + 19 * 4);

#endif
