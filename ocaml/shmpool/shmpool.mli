(** Crash-safe shared-memory page pools.

    A pool is a block of shared memory from which any process that maps it
    allocates page-granular blocks, returned as bigarrays of the same type
    as [Netsys_mem.memory] (no OCamlnet needed).

    A pool is shared with children forked (e.g. [Unix.fork]) after it was
    created, at the same address; a named pool can also be {!attach}ed by an
    unrelated process, at whatever address the kernel picks.

    {b Crash safety.} The pool is guarded by a robust process-shared lock:
    a process killed in the middle of an operation (even by [SIGKILL]) never
    leaves the pool locked or corrupt; the next process to use it rebuilds
    the allocator's derived state and goes on ({!val:stats}[.recoveries] counts
    these). Blocks record their owner process; {!reclaim_dead} frees those
    of processes that no longer exist. Whether a process exists is what the
    kernel says, not [/proc]: each process that allocates has a small thread
    (signals blocked, never running OCaml) hold a robust mutex of the pool
    while it has the pool open, and the kernel marks that mutex when the
    process dies, in whatever PID namespace (containers sharing [/dev/shm]).
    Only a process without one (it closed the pool, or no thread could be
    created) is looked up in [/proc], and only from its own PID namespace:
    across namespaces it counts as alive and is never reclaimed.

    {b Costs.} alloc and free are O(1) for blocks of up to 127 pages and
    O(log n) in the number of free runs above that. {!val:stats} is not a
    hot-path call: it gives this process's cache back first (see
    {!val:stats}). The metadata lives outside the payload pages, in a header
    of about 51 KiB plus 12 bytes per payload page, rounded up to whole pages
    ({!total_for_payload} gives the exact size), so writing past the end of
    a block cannot corrupt the pool.

    {b The per-process cache.} A process keeps up to 32 of its own freed
    blocks of each size from 1 to 64 pages, and 16 longer ones (reused for
    the same length), at most a 16th of the pool in all, and
    reuses them without taking the pool's lock, so that several processes
    allocating at once do not queue on it. Cached blocks count as free in
    {!val:stats}; an alloc that finds no large enough free run takes every
    process's cached blocks back first, so caching does not make an alloc
    fail (unless a cache's owner is frozen, by a debugger or [SIGSTOP], in
    the middle of a cache operation: that cache is then skipped, nobody
    waits on it, and its blocks stay counted as free). A process gives its
    cache back at a normal exit, in {!val:stats} and {!flush_cache}; a
    killed one's goes back to the free runs the next time any process takes
    the pool's lock. Because
    cached blocks coalesce only when given back, a pool run nearly full with
    blocks of many sizes fragments sooner: {!set_caching} turns it off.

    {b Thread safety.} Every function may be called from any thread of any
    process that maps the pool.

    {b Errors.} Bad sizes raise [Invalid_argument]; bad shm names raise
    [Invalid_argument "<function>: bad shm name"]; an exhausted pool raises
    {!Out_of_pool_memory}; a memory value that is not the start of a live
    block of this pool raises [Invalid_argument] (for {!val:free}) or
    [Not_found] (for {!val:size}); a failing system call raises [Failure] with
    the call and the system's message; any use of a closed pool raises
    [Failure "<function>: pool is closed"]. After any of these the pool is
    exactly as it was. An internal error of the Rust core (a bug) raises
    [Failure "<function>: internal error: <message>"] (its message is also
    printed on stderr); it never aborts the process.

    {b Shm names} are bytes, not text: a ['/'] followed by 1 to 254 bytes,
    none of them ['/'] or NUL (any other byte, UTF-8 or not, is fine). *)

type memory = (char, Bigarray.int8_unsigned_elt, Bigarray.c_layout) Bigarray.Array1.t
(** The type of blocks; the same type as [Netsys_mem.memory]. *)

type t
(** A pool as seen by this process. *)

exception Out_of_pool_memory
(** No free run of the pool is large enough for the request. *)

exception Not_a_pool of string
(** {!attach}: the shared memory object is not a pool of this version
    (with the reason). *)

val page_size : int
(** The system page size; every block is a whole number of pages. *)

val create : ?name:string -> ?prefault:bool -> int -> t
(** [create size] makes a pool whose payload holds at least [size] bytes
    (rounded up to whole pages; the header comes on top of that).

    @param name a POSIX shared memory name (["/something"], see {e Shm
    names} above): the pool is
    then visible as [/dev/shm/something] and can be {!attach}ed by other
    processes; it outlives this process until {!unlink}ed. Without a name
    the pool is anonymous: visible to this process and to the children it
    forks afterwards only, and gone when the last of them exits.
    @param prefault reserve the memory now ([posix_fallocate]): a machine
    short of memory then fails here, with [Failure], instead of killing a
    process with [SIGBUS] when it first touches a page. Default [false].
    @raise Invalid_argument if [size <= 0] or the pool would exceed the
    format's limit (2{^30} pages), or if [name] is not a valid shm name.
    @raise Failure if the shared memory cannot be created (e.g. the name
    exists). *)

val attach : string -> t
(** [attach name] maps the named pool created by another process.
    @raise Invalid_argument if [name] is not a valid shm name.
    @raise Not_a_pool if the object is not a pool of this layout.
    @raise Failure if it cannot be opened. *)

val alloc : t -> int -> memory
(** [alloc pool n] allocates a block of [n] bytes rounded up to whole
    pages and returns it. The block is page-aligned, its length is the
    rounded size, and its contents are not zeroed. Best fit: the smallest
    free run that holds it.
    @raise Invalid_argument if [n <= 0].
    @raise Out_of_pool_memory if no free run is large enough (including
    [n] larger than the pool). *)

val free : t -> memory -> unit
(** [free pool m] frees the block that starts at the first byte of [m]
    (only the start address matters: a sub-array starting at the block's
    first byte frees the whole block). Any process may free any block.
    @raise Invalid_argument ["Shmpool.free: not the start of a live block"]
    for a double free, an address inside a block, or memory of another
    pool, with the pool unchanged. That holds for racing double frees too:
    a free that began before the block was freed by another thread or
    process and allocated again fails, instead of freeing the new
    allocation. (A free that begins after the re-allocation returned frees
    the new block: with only an address, nothing tells it from a correct
    free.) *)

val size : t -> memory -> int
(** Size in bytes of the block starting at the first byte of [m].
    @raise Not_found if no live block starts there. *)

val size_at_addr : t -> nativeint -> int
(** Same as {!val:size}, by address.
    @raise Not_found if no live block starts there. *)

(** Pool-wide figures, exact at one instant. *)
type stats = {
  total : int;
      (** bytes of the whole mapping: the payload plus the header (which
          takes [total - payload] bytes) *)
  free : int;  (** free payload bytes *)
  largest_free : int;
      (** bytes of the largest free run, after taking back every cache
          that may hold a longer block: a size {!alloc} can always satisfy,
          and allocating it again and again until it is 0 obtains [free] in
          all (save blocks cached by a process frozen mid-operation) *)
  payload : int;  (** payload capacity in bytes *)
  live_blocks : int;  (** blocks allocated and not freed *)
  page_size : int;  (** the page size *)
  recoveries : int;
      (** times a process found the pool abandoned mid-operation by a
          dead process, and repaired it *)
}

val stats : t -> stats
(** Takes the pool lock. It first gives this process's cached blocks back
    (as {!flush_cache}: one free per cached block)
    and looks at every process's cache slot, so that the figures are exact;
    the figures themselves are counters. When another process's cache may
    hold a block longer than every free run (a nearly full or fragmented
    pool), it takes that cache back, which scans the page descriptors
    (O(pages), about 1 ms per GiB), so that [largest_free] is always
    obtainable. Cheap enough for monitoring, not for a hot loop. *)

val debug_info : t -> string
(** A multi-line picture: sizes ([pool_size] is the payload), then
    [allocations (offs->bsize): {...}] with each live block's offset in the
    mapping and size, then the free runs and the blocks cached in processes
    likewise, then a few figures ([header_size] among them). *)

val check : t -> string list
(** Verifies every invariant of the pool's metadata (every page accounted
    for once, lists and tree agree with the page descriptors, counters
    agree) and returns the violations; [[]] for a sound pool. O(pages),
    under the lock: for tests and diagnostics. *)

(** A process that holds (or held) blocks. *)
type owner = {
  pid : int;  (** 0 for blocks whose owner could not be recorded *)
  alive : bool;
      (** still running, as the kernel says (a reused pid does not count);
          [true] when that cannot be known (see crash safety above) *)
  pages : int;  (** pages it holds *)
  blocks : int;  (** blocks it holds *)
}

val owners : t -> owner list
(** Per-process usage. *)

(** What {!reclaim_dead} freed. *)
type reclaimed = {
  blocks_freed : int;
  pages_freed : int;
  dead : (int * int) list;  (** [(pid, pages)] of each dead owner *)
}

val reclaim_dead : t -> reclaimed
(** Frees every block whose owner process no longer exists. Never done
    automatically: a dead worker's block may hold a result that another
    process still reads. A process of another PID namespace that closed the
    pool before dying is never taken for dead (see crash safety above). *)

val flush_cache : t -> unit
(** Gives this process's cached blocks back to the pool, where they
    coalesce with their free neighbours (see the per-process cache above).
    {!val:stats} does it too. *)

val flush_caches : unit -> unit
(** {!flush_cache} for every pool this process has open: what a normal
    exit does. For a child process that lives on after its work is done
    (a worker whose task function returned), so that its cached blocks do
    not wait for its exit. Never raises. *)

val set_caching : t -> bool -> unit
(** Turns this process's cache on (the default) or off, for this [t] and
    the children forked afterwards; turning it off gives the cache back.
    Caching defers the coalescing of the blocks it holds: on a pool that
    runs nearly full with blocks of many sizes, a process can prefer exact
    coalescing to speed. *)

val unlink : t -> unit
(** Removes a named pool's name (no-op for anonymous pools); mappings stay
    valid.
    @raise Failure if the name is already gone. *)

val name : t -> string option
(** The pool's shm name, if it has one (also after {!close}). *)

val close : t -> unit
(** Closes the pool in this process: using [t] afterwards raises
    [Failure] (except {!name}; closing again does nothing). Blocks of the pool that are
    still reachable stay valid memory of {e this} pool (never of a pool
    created or attached later): the mapping is removed only once the GC has
    collected the last of them. Writing into such a block after [close] is
    still a bug (another process may have been given that memory). Other
    processes are not affected. *)

val addr_of : memory -> nativeint
(** The address of the first byte of a memory value ([[@@noalloc]] in
    native code). *)

(** {2 For the Netmcore shim} *)

val format_in_place : ?zeroed:bool -> memory -> t
(** [format_in_place m] makes a new pool in [m], memory mapped by someone
    else (e.g. a Netmcore preallocated shm object), at the same address in
    every process that will use it. The pool keeps [m] reachable until it
    is closed, and its blocks keep [m] reachable as long as they are, so a
    GC-managed [m] (e.g. from [Unix.map_file]) is not unmapped under them;
    [m] must not be unmapped by other means while they are in use. The call
    must happen before any other process uses [m]. With [~zeroed:true] (default
    [false]) the caller promises that [m] is all zeros, as a freshly created
    object is; the pool's page descriptors are then not written, which
    makes creating a large pool much cheaper.
    @raise Invalid_argument if [m] cannot hold one payload page. *)

val attach_in_place : memory -> t
(** Opens the pool previously formatted in [m] (kept reachable as by
    {!format_in_place}).
    @raise Not_a_pool if [m] holds no pool. *)

val fork_generation : unit -> int
(** A number that changes in a child process right after [fork]: state
    looked up before a fork (such as which pools a process may use) can be
    looked up again in the child. Cheap: a load from memory (a bigarray over
    the counter the fork hook bumps), no call into C. *)

val total_for_payload : int -> int
(** Bytes of shared memory a pool with [n] payload bytes needs.
    @raise Invalid_argument if [n <= 0] or too large. *)

val prefault_shm : ?len:int -> string -> unit
(** Reserves the backing store of the named shm object (see [prefault]):
    its first [len] bytes, or all of it (the default).
    @raise Invalid_argument if the name is not a valid shm name.
    @raise Failure if the object cannot be opened or the memory reserved. *)

(**/**)

val heap_handle : t -> int
(** Internal: the handle the shared-heap stubs take
    ([Shmpool_netmcore.Netmcore_heap]). *)

val error_code : string -> int
(** Internal: the (negative) FFI error code of that name, defined once in
    [rust/src/error.rs]; fails if the stubs define no such code. *)
