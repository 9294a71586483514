(** The drop-in replacement for OCamlnet's [Netmcore_mempool].

    Switch an existing program with one line:
    {[
      module Netmcore_mempool = Shmpool_netmcore.Netmcore_mempool
    ]}
    and add [shmpool.netmcore] to its libraries (after [threads.posix]). *)

module Netmcore_mempool : sig
  (** Memory pools, as OCamlnet 4.1.9's [Netmcore_mempool], backed by
      shmpool.

      A memory pool is a block of shared memory set aside for storing shared
      data. It is a Netmcore resource (a preallocated shm object), created
      before the workers are forked, which then inherit it at the same
      address: pass its resource ID (or [`All], the default) as
      [~inherit_resources] to [Netmcore.start].

      {b Deliberate differences from the original} (everything else behaves
      the same, including exception values and messages):
      - [size_mem] and [size_mem_at_addr] raise [Not_found] for an address
        where no block starts, as the original documents (the original
        raises [Failure]).
      - [alloc_mem] with a size larger than the pool (e.g. [max_int]) raises
        [Out_of_pool_memory] (the original: [Invalid_argument "index out of
        bounds"]).
      - There is no cap on the number of live blocks (the original gives
        [Out_of_pool_memory] after [64 + pages/4] blocks and leaks a page
        each time); a pool can be filled entirely with 1-page blocks.
      - 1- and 2-page pools work (the original corrupts memory).
      - The size given to [create_mempool] is the payload: the shared object
        is larger by the header (8 bytes per page plus about 35 KiB), and
        [stats]' [total] includes it. The original carves its header out of
        the given size.
      - A worker that dies (even by [SIGKILL]) in the middle of an operation
        never leaves the pool locked or corrupt; its blocks can be freed
        with [Shmpool.reclaim_dead (Shmpool_netmcore.shmpool id)].
      - The process that created the pool may use it too (also the
        original's, contrary to its documentation).
      - [debug_info] prints the same leading lines ([pool_size], [pool_free],
        [pool_free_contiguous], [pool_start], [allocations]) then the free
        runs instead of the original's 64 free lists, then blocks held in
        per-process caches and a few more figures.
      - Each process caches up to 32 of its own freed blocks per size of 1 to
        64 pages and 16 longer ones (at most a 16th of the pool) and reuses
        them (same length only) without the
        lock. They count as free in [stats], and [contiguous] is the largest
        free run after [stats] takes back any cache that may hold a longer
        block: always a size [alloc_mem] can satisfy, and allocating it
        until it is 0 obtains [free] in all. A process gives its cache back
        in [stats] and at a normal exit; a killed one's goes back at the
        next lock acquisition by any process; an [alloc_mem] that finds no
        large enough free run takes all caches back first, so it does not
        fail because of them. See {!Shmpool}.

      {b Limitation.} OCamlnet's own [Netmcore_heap] (and the structures
      built on it: [Netmcore_array], [Netmcore_hashtbl], ...) is compiled
      against OCamlnet's pool and keeps using it. *)

  exception Out_of_pool_memory
  (** The same exception as [Netmcore_mempool.Out_of_pool_memory], so
      existing handlers keep matching. *)

  val create_mempool : ?alloc_really:bool -> int -> Netmcore.res_id
  (** Creates the pool as a shared memory object whose payload holds the
      passed size (rounded up to whole pages), and returns its resource ID.
      May be called before [Netmcore.startup].

      [alloc_really]: reserve the memory now ([posix_fallocate]), so that a
      machine short of memory fails here rather than with a bus error at
      first touch. Much faster than the original's writing of every page.

      Pools have kernel persistence until released or unlinked: call
      [unlink_mempool].
      @raise Invalid_argument ["Netmcore_mempool.create_mempool: bad size"]
      if the size is [<= 0] (or beyond 4 TiB). *)

  val alloc_mem : Netmcore.res_id -> int -> Netsys_mem.memory
  (** Allocates a block of the passed size, rounded up to whole pages: a
      page-aligned sub-array of the pool's mapping, not zeroed.
      @raise Invalid_argument ["Netmcore_mempool.alloc_mem: bad size"] if
      the size is [<= 0].
      @raise Out_of_pool_memory if no contiguous free space is large
      enough.
      @raise Netmcore.No_resource for an unknown resource ID.
      @raise Failure ["Netmcore_mempool: this resource is not a pool"] for
      a resource that is not a pool. *)

  val size_mem : Netmcore.res_id -> Netsys_mem.memory -> int
  (** Returns the size of the block starting at the first byte of the
      passed memory.
      @raise Not_found if no block starts there. *)

  val size_mem_at_addr : Netmcore.res_id -> nativeint -> int
  (** Returns the size of the block at this address.
      @raise Not_found if no block starts there. *)

  val free_mem : Netmcore.res_id -> Netsys_mem.memory -> unit
  (** Frees the block starting at the first byte of the passed memory (a
      sub-array or [Netsys_mem.grab] of the block's start frees the whole
      block). Any process may free any block.
      @raise Failure ["Netmcore_mempool.free_mem: memory block not found"]
      if no block starts there (double free, interior address, foreign
      memory); the pool is unchanged. *)

  val stats : Netmcore.res_id -> int * int * int
  (** Returns [(total, free, contiguous)]: [total] is the size of the
      shared object (header included), [free] the number of free bytes,
      [contiguous] the size of the largest contiguous free block. *)

  val debug_info : Netmcore.res_id -> string
  (** Returns a string describing the allocations etc. *)

  val shm_name : Netmcore.res_id -> string
  (** Returns the name of the shared memory object. *)

  val sem_container : Netmcore.res_id -> Netsys_sem.container
  (** Returns the semaphore container of the Netmcore resource. *)

  val unlink_mempool : Netmcore.res_id -> unit
  (** Deletes the persistent objects of this pool ([shm_unlink]); existing
      mappings stay valid. *)

  module Debug : sig
    val enable : bool ref
    (** Enable debugging (Netlog module ["Netmcore_mempool"]). *)

    val enable_alloc : bool ref
    (** Trace allocation and deallocation (Netlog module
        ["Netmcore_mempool.alloc"]). *)
  end
end

val shmpool : Netmcore.res_id -> Shmpool.t
(** The {!Shmpool.t} behind a pool, for what the original cannot do:
    {!Shmpool.check}, {!Shmpool.owners}, {!Shmpool.reclaim_dead},
    {!val:Shmpool.stats} (with recoveries).
    @raise Netmcore.No_resource for an unknown resource ID. *)
