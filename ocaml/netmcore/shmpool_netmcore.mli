(** Drop-in replacements for OCamlnet 4.1.9's netmulticore modules: the
    pool ([Netmcore_mempool]), the shared heap ([Netmcore_heap],
    [Netmcore_ref]) and the structures on it ([Netmcore_array],
    [Netmcore_matrix], [Netmcore_hashtbl], [Netmcore_queue],
    [Netmcore_buffer], [Netmcore_mutex], [Netmcore_sem],
    [Netmcore_condition]), each with the original's signature.

    Switch a whole existing program with one line, [open Shmpool_netmcore]
    (which also brings {!Netmcore_process} and {!Netmcore}, see there), or
    one module at a time:
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
        is larger by the header (about 51 KiB plus 12 bytes per page, rounded
        up to whole pages: [Shmpool.total_for_payload] gives the size), so a
        fresh pool has all of [stats]' [total] (the size given, rounded up
        to pages, as the original's) free. The original carves its header
        out of the given size.
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
        in [stats], at a normal exit, and when its function returns if it
        was defined with {!Shmpool_netmcore.Netmcore_process}; a killed
        one's goes back at the
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

      Called in a worker: as with the original, Netmcore creates the object
      in the master on the worker's behalf; the workers started afterwards
      with the pool in [~inherit_resources] use it (at the master's
      address), and Netmcore destroys the object when the creating worker
      ends. Unlike the original (whose creating worker gets [Failure
      "Netmcore.get_resource: The `Posix_shm_preallocated_sc resource
      exists but is not shared with this worker"] on every use), the
      creating worker can use the pool at once, through a mapping of its
      own at its own address: pass blocks to other processes by offset,
      and use heaps on it ({!Netmcore_heap}, which hold addresses) from
      other processes only: in the creating worker, [create_heap] and
      [heap_of_descr] raise [Failure].

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
  (** Returns [(total, free, contiguous)]: [total] is the size given to
      [create_mempool] rounded up to whole pages (as the original's; the
      header is not part of it, {!val:Shmpool.stats} has its size), [free] the
      number of free bytes, [contiguous] the size of the largest contiguous
      free block. *)

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

(** {2 Shared heaps}

    [Netmcore_heap] and [Netmcore_ref] with OCamlnet 4.1.9's signatures,
    on a pool of {!Netmcore_mempool} (a heap's memory is blocks of the
    pool). Switch with [open Shmpool_netmcore] or
    [module Netmcore_heap = Shmpool_netmcore.Netmcore_heap] (and the same
    for [Netmcore_ref]).

    Every value in a heap has a black header and the pool is registered
    with the runtime as static data, so OCaml's own GC never scans, moves
    or frees heap values, and a heap value held in private data survives
    [Gc.compact] (with the original, the compactor corrupts such a value:
    the process later crashes). The heap has its own mark-sweep collector:
    values unreachable from the root, from the values pinned by
    [with_value] and from those added during the running [modify] are
    reclaimed by [gc] and before the heap grows; blocks the heap no longer
    needs go back to the pool, and [destroy] returns the pool's [stats] to
    what they were before [create_heap].

    Its lock is robust: a worker killed anywhere inside [modify],
    [with_value]'s [find], [add] or [gc] never blocks the others (with the
    original, every later [modify] hangs). The next process to lock the
    heap rebuilds the heap's bookkeeping from what the root reaches: a
    value half-copied by the dead process is never reachable.

    {b Deliberate differences} (everything else as the original, including
    exception values and messages):
    - [modify] is re-entrant in the thread that runs it: a nested [modify],
      [gc] inside [modify], and [modify] from [with_value]'s [find] work
      (the original deadlocks).
    - Every value added during a [modify] stays alive until it returns,
      even if not yet attached to the root (the original may reclaim it at
      the next [add]); [pin] is still accepted.
    - [add_uniform_array] and [add_init_array] with [n = 0] return [[||]]
      (the original: [Assert_failure]); negative sizes, and [add_string]
      with a negative length, raise [Invalid_argument].
    - [add_immutable] shares only parts already in {i this} heap.
    - [heap_of_descr] with any bad descriptor raises [Failure
      "Netmcore_heap.heap_of_descr: no heap structure found at this
      address"]; any use of a destroyed heap but a second [destroy] raises
      [Failure "Netmcore_heap: heap destroyed"] (the original reads freed
      memory).
    - An escaped mutator raises the original's "invalid mutator" [Failure]
      for [pin] too.
    - [minimum_size] is our own figure; [debug_info] prints the original's
      first two lines, then our chunks, free lists and counters.
    - With [with_value], a process killed during [process] leaks no pin,
      and an exception in [process] releases its pins.

    As with the original, only values of the heap may be stored into heap
    values (inside [modify]), the pool must be mapped at the same address
    in every process (true of Netmcore pools), and [deref_ro] may read a
    value that a parallel [assign] and [gc] reclaim. *)

module Netmcore_heap : sig
  type 'a heap = 'a Heap.heap
  (** A heap whose root has type ['a]: a small record naming the pool and
      the heap, which can be marshalled to other workers. *)

  type 'a descr = 'a Heap.descr
  (** The heap's place in its pool (an [int]); {!heap_of_descr} gives the
      heap back in any worker of the pool. *)

  val create_heap : Netmcore.res_id -> int -> 'a -> 'a heap
  (** [create_heap pool size root]: a heap whose first block leaves at least
      [size] bytes for values, with a deep copy of [root] as its root. It
      grows by further blocks of the pool when needed.
      @raise Failure ["Netmcore_heap.create_heap: the root element is not a
      block"] for an immediate root.
      @raise Invalid_argument ["Netmcore_mempool.alloc_mem: bad size"] if
      [size <= 0].
      @raise Failure ["Netsys_mem.init_value: Library error"] if [root]
      cannot be copied (see {!add}); the pool is unchanged.
      @raise Netmcore_mempool.Out_of_pool_memory *)

  val minimum_size : 'a -> int
  (** A [size] for {!create_heap} that holds a copy of the value.
      @raise Failure as {!add} for a value that cannot be copied. *)

  val root : 'a heap -> 'a
  (** The root (no lock: a load). *)

  val descr_of_heap : 'a heap -> 'a descr
  val heap_of_descr : Netmcore.res_id -> 'a descr -> 'a heap
  (** @raise Failure ["Netmcore_heap.heap_of_descr: no heap structure found
      at this address"] for anything but a live heap of this pool. *)

  type mutator = Heap.mutator
  (** The right to add values, valid during one {!modify}. *)

  val modify : 'a heap -> (mutator -> 'r) -> 'r
  (** [modify h f] runs [f] with the heap locked (re-entrant in the calling
      thread); the lock is released when [f] returns or raises. Inside [f],
      store into heap values only immediates and values of this heap. *)

  val add : mutator -> 'a -> 'a
  (** A deep copy of the value in the heap, keeping sharing and cycles.
      Copied: every block but those below, including strings, floats,
      float arrays, [int32], [int64], [nativeint] and bigarrays (their data
      is copied into the heap); a forced lazy is replaced by its value;
      immediates are returned as they are.
      @raise Failure ["Netsys_mem.init_value: Library error"] for closures,
      objects, unforced lazies, exceptions, abstract blocks and custom
      blocks of other kinds (channels, ...), anywhere in the value; nothing
      is allocated then.
      @raise Failure ["Netmcore_heap.add: invalid mutator"] after its
      [modify] returned.
      @raise Netmcore_mempool.Out_of_pool_memory *)

  val add_immutable : mutator -> 'a -> 'a
  (** As {!add}, but parts already in this heap are shared, not copied. *)

  val add_uniform_array : mutator -> int -> 'a -> 'a array
  (** An array of [n] times one copy of the value (a float array for a
      float); [[||]] for [n = 0].
      @raise Invalid_argument for [n < 0]. *)

  val add_init_array : mutator -> int -> (int -> 'a) -> 'a array
  (** An array whose element [k] is a copy of [f k]. *)

  val add_some : mutator -> 'a -> 'a option
  (** [Some x] in the heap; [x] is not copied: it must be in the heap. *)

  val add_string : mutator -> int -> string
  (** A string of [n] zero bytes in the heap (to be filled with
      [Bytes.unsafe_of_string] inside [modify]).
      @raise Invalid_argument for [n < 0]. *)

  val pin : mutator -> 'a -> unit
  (** Keeps the value alive until [modify] returns (every value added
      during a [modify] is kept alive anyway). *)

  val copy : 'a -> 'a
  (** A deep copy in private memory.
      @raise Failure ["Netsys_mem.copy_value: Library error"] for values
      that cannot be copied. *)

  val with_value : 'a heap -> (unit -> 'b) -> ('b -> 'c) -> 'c
  (** [with_value h find process]: [find ()] runs with the heap locked; its
      result, a value of the heap, stays alive (pinned for this process)
      while [process] runs without the lock. The pins go when [process]
      returns or raises, or when the process dies. *)

  val with_value_2 : 'a heap -> (unit -> 'b * 'c) -> ('b * 'c -> 'z) -> 'z
  val with_value_3 : 'a heap -> (unit -> 'b * 'c * 'd) -> ('b * 'c * 'd -> 'z) -> 'z
  val with_value_4 : 'a heap -> (unit -> 'b * 'c * 'd * 'e) -> ('b * 'c * 'd * 'e -> 'z) -> 'z

  val with_value_5 :
    'a heap -> (unit -> 'b * 'c * 'd * 'e * 'f) -> ('b * 'c * 'd * 'e * 'f -> 'z) -> 'z

  val with_value_n : 'a heap -> (unit -> 'b list) -> ('b list -> 'c) -> 'c
  (** As {!with_value}, pinning each component. *)

  val destroy : 'a heap -> unit
  (** Gives every block of the heap back to the pool.
      @raise Failure ["Netmcore_mempool.free_mem: memory block not found"]
      for a heap destroyed already. *)

  val gc : 'a heap -> unit
  (** Collects the heap now (also done before it grows). *)

  val pool : 'a heap -> Netmcore.res_id
  val mut_pool : mutator -> Netmcore.res_id
  val sem_container : 'a heap -> Netsys_sem.container
  val mut_sem_container : mutator -> Netsys_sem.container

  val debug_info : 'a heap -> string
  (** The original's first two lines ([pool = ...], [value = @0x...]), then
      chunks, free lists and counters. *)

  module Debug : sig
    val enable : bool ref
    (** Netlog debugging, module ["Netmcore_heap"]. *)
  end

  (**/**)

  type stats = {
    chunks : int;
    heap_words : int;
    free_words : int;
    live_words : int;
    gcs : int;
    recoveries : int;
    pins : int;
  }

  val stats : 'a heap -> stats
  val contains : mutator -> 'a -> bool
end

module Netmcore_ref : sig
  type 't sref
  (** A shared reference: a heap whose root is a [ref]. *)

  type 't sref_descr

  val sref : Netmcore.res_id -> 't -> 't sref
  (** A new reference holding a copy of the value (see
      {!Netmcore_heap.add} for what can be copied). *)

  val assign : 't sref -> 't -> unit
  (** Stores a copy of the value. *)

  val deref_ro : 't sref -> 't
  (** The contents, without lock: a parallel [assign] followed by a heap
      GC may reclaim the value returned. *)

  val deref_p : 't sref -> ('t -> 'a) -> 'a
  (** [deref_p r f]: [f] on the contents, kept alive while [f] runs. *)

  val deref_c : 't sref -> 't
  (** A private copy of the contents. *)

  val heap : 't sref -> Obj.t Netmcore_heap.heap
  val descr_of_sref : 't sref -> 't sref_descr
  val sref_of_descr : Netmcore.res_id -> 't sref_descr -> 't sref
end

(** {2 Shared structures}

    [Netmcore_array], [Netmcore_hashtbl] and [Netmcore_queue] with
    OCamlnet 4.1.9's signatures, on {!Netmcore_heap}: every function
    returns, raises and locks as the original's (the [_ro] functions read
    without the lock, [_p] pin the value while the function runs, [_c]
    copy it to private memory).

    {b Crash safety} (the original has none): a worker killed anywhere
    inside an operation never blocks the structure, and its operation
    happened entirely or not at all. Each operation changes what the root
    reaches by one store of a completely built value; the counters
    ([Netmcore_hashtbl.length], [Netmcore_queue.length]) and the queue's
    tail are recomputed from the contents by the first operation after the
    death (which is why [length] takes the lock here).

    {b Deliberate differences}:
    - [Netmcore_queue.iter] and [fold] pin only the first cell of the
      snapshot (which keeps the rest of it alive), not every element.
    - [Netmcore_hashtbl.iter] may modify the table from [f] (the lock is
      re-entrant; the original deadlocks), with the visit then unspecified.
    - [Netmcore_array.make] and [init] with a negative size raise the
      original's [Invalid_argument "Netsys_mem.init_array"] before creating
      anything (the original leaves a heap behind); with size 0 they give
      an empty array (the original: [Assert_failure]). *)

module Netmcore_array : module type of struct
  include Sarray
end

module Netmcore_hashtbl : module type of struct
  include Shashtbl
end

module Netmcore_queue : module type of struct
  include Squeue
end

(** {2 Matrices and buffers}

    [Netmcore_matrix] and [Netmcore_buffer] with OCamlnet 4.1.9's
    signatures, results and exceptions, on {!Netmcore_heap}; crash-safe as
    the structures above (each change commits with one store: a buffer's
    added bytes are written past its end, then counted by one store of its
    new state).

    {b Deliberate differences}:
    - [Netmcore_matrix.make] with a float builds flat float rows, as
      [create] and [init] do (the original's [make] builds rows of another
      kind there: its [deref] then reads garbage).
    - [Netmcore_matrix.make] and [init] with a dimension 0 give an empty
      matrix, a negative one raises [Invalid_argument "Netmcore_matrix.make"]
      (or ["...init"]) before creating anything (the original: an
      [Assert_failure] in both cases). *)

module Netmcore_matrix : module type of struct
  include Smatrix
end

module Netmcore_buffer : module type of struct
  include Sbuffer
end

(** {2 Mutexes, semaphores, conditions}

    With OCamlnet 4.1.9's signatures; create them with a mutator and store
    them in a heap value (a header), as with the original. A [`Normal]
    mutex is a binary semaphore with no owner, as the original's: any
    thread of any process may [unlock] it; an [`Errorcheck] or
    [`Recursive] mutex is a robust process-shared pthread mutex, owned by
    a thread. {b A mutex whose holder died (even by [SIGKILL], even if it
    is not reaped yet) is taken over by the next locker, whose [lock]
    returns normally} (a [`Normal] mutex's sleeping locker notices the
    death within 50 ms); [Netmcore_mutex.recoveries] (ours only) counts the
    takeovers, so a program that must know whether the data the mutex
    protects may be half-updated can compare it before and after [lock].
    Semaphores and conditions are futexes: a waiter that dies leaves
    nothing blocked or lost.

    {b Deliberate differences}:
    - Owners of [`Errorcheck] and [`Recursive] mutexes are threads, not
      processes ([`Errorcheck] fails for a second lock by the same thread).
    - A [`Recursive] mutex excludes other processes until its owner's last
      [unlock] (the original's releases at every [unlock]: after lock, lock,
      unlock another process gets it, and the owner's last unlock raises).
    - [unlock] of an [`Errorcheck] or [`Recursive] mutex by a thread that
      does not hold it raises [Failure "Netmcore_mutex.unlock: not locked
      by this process"]; [unlock] of a free [`Normal] mutex raises [Failure
      "Netmcore_mutex.unlock: not locked"] (the original's then counts one
      more free slot, so two lockers get it).
    - A plain [wait] needs no wait entry: [wait_entry] is a token.
      [Netmcore_condition.wait_e] works as the original's (the entry's named
      pipe receives a byte when the condition is signalled; the engine then
      takes the mutex and continues with the given function); queued
      event waiters are woken before plain waiters, oldest first, and a
      [signal] whose event waiter died (no reader on its pipe) goes on to
      the next waiter instead of being lost; a signaller or waiter that
      dies inside [signal], [broadcast] or [wait_e] (even one left an
      unreaped zombie) blocks no one and leaves no event waiter waiting
      for a signal already given. An aborted [wait_e] engine
      leaves the queue and passes on a signal it had already been given.
      The wait set keeps its event entries alive: allocate and free them
      through it, as the original requires. *)

module Netmcore_mutex : module type of struct
  include Smutex
end

module Netmcore_sem : module type of struct
  include Ssem
end

module Netmcore_condition : module type of struct
  include Scondition
end

(**/**)

module Struct_internal : sig
  val commit_hook : (string -> unit) ref
  (* Test-only: called with a point's name at each staged-death point of
     the structures (see commit_point.ml). *)

  val sync_crash_at : string -> unit
  (* Test-only: this process SIGKILLs itself when a condition operation
     reaches the named point: ["signal:marked"] (an event waiter's entry
     marked signalled, its pipe not yet written), ["signal:written"] (the
     pipe written, the entry still queued), ["cond:list-locked"] (the
     event-waiter list locked by a signal), ["cond:dequeue-locked"] (the
     list locked by an event waiter unlinking itself), ["wait:counted"] (a
     [wait]er counted, its mutex not yet released), ["wait:woken"] (a
     [wait]er woken, its mutex not yet locked again); [""] disarms. The
     event waiter's own steps are [commit_hook] points: ["wait_e:enqueued"]
     (queued, the mutex not yet released), ["wait_e:woken"] (its pipe read
     and its entry signalled, not yet unlinked), ["wait_e:dequeued"]
     (unlinked, the mutex not yet locked). *)

  val mutex_set_holder : Netmcore_mutex.mutex -> int -> int -> unit
  (* Test-only: [mutex_set_holder m pid d] makes the [`Normal] mutex [m]
     look held by the running process [pid] as if it had started [d]
     clock ticks later than it did: a dead holder whose pid was reused
     ([d] = 0: the start time unknown, only the pid is checked). Failure if
     [m] is not a [`Normal] mutex or [pid] does not run. *)
end

(**/**)

module Heap_internal : sig
  val modify_repairing :
    'a Netmcore_heap.heap -> repair:(Netmcore_heap.mutator -> unit) -> (Netmcore_heap.mutator -> 'r) -> 'r
  (** For structures built on a heap: [modify], but if the heap was
      recovered after a holder's death since the structure was last
      repaired, [repair] (which must be idempotent: it recomputes the
      structure's own counters from its contents) runs first. *)
end

(** {2 Workers that give their cache back when their function returns}

    A process keeps some of the blocks it freed in a per-process cache (see
    {!Shmpool}) and gives them back at its exit. A Netmcore worker, though,
    delivers its result, and [Netmcore_process.join] returns, before the
    worker exits: a [stats] right after [join] may still see the blocks
    that worker cached (they count as free, and [alloc_mem] takes them back
    when it needs them, but they are not part of a contiguous free run).
    Processes defined with the two modules below give their cache back as
    soon as their function returns or raises, so [stats] after [join] is
    what it was before the worker started (if the worker freed everything
    it allocated). [open Shmpool_netmcore] is enough to get them. *)

module Netmcore : sig
  include module type of struct
    include Netmcore
  end
  (** OCamlnet's [Netmcore]: the same types, exceptions and values, but
      for [def_process]. *)

  val def_process : (Netplex_encap.encap -> Netplex_encap.encap) -> res_id * res_id
  (** As OCamlnet's, and the process gives its cached blocks back when the
      function returns or raises. *)
end

module Netmcore_process : sig
  include module type of struct
    include Netmcore_process
  end
  (** OCamlnet's [Netmcore_process]: the same types (fork and join points
      mix with the original's functions) and values, but for
      [def_process]. *)

  val def_process : ('a -> 'b) -> 'a fork_point * 'b join_point
  (** As OCamlnet's, and the process gives its cached blocks back when the
      function returns or raises. *)
end
