(* Shmpool_netmcore.Netmcore_heap and Netmcore_ref in one process (the
   pool's creator may use it): the exact signatures, every function on both
   implementations through one functor (same observable results), the
   deliberate differences, survival of heap values held in private data
   under Gc.compact (where OCamlnet's corrupts them), and destroy restoring
   the pool. Worker and kill tests: test_heap_workers.ml. *)

(* The compatibility contract: these lines compiling are the test. *)
module _ : Heap_sigs.HEAP = Shmpool_netmcore.Netmcore_heap
module _ : Heap_sigs.REF = Shmpool_netmcore.Netmcore_ref

(* The operations a test uses, on either implementation. *)
module type IMPL = sig
  val name : string
  val create_mempool : int -> Netmcore.res_id
  val unlink_mempool : Netmcore.res_id -> unit
  val stats : Netmcore.res_id -> int * int * int

  module H : Heap_sigs.HEAP

  module R : sig
    type 't sref

    val sref : Netmcore.res_id -> 't -> 't sref
    val assign : 't sref -> 't -> unit
    val deref_ro : 't sref -> 't
    val deref_p : 't sref -> ('t -> 'a) -> 'a
    val deref_c : 't sref -> 't
    val heap : 't sref -> Obj.t H.heap
  end
end

module Orig : IMPL = struct
  let name = "ocamlnet"
  let create_mempool n = Netmcore_mempool.create_mempool n
  let unlink_mempool = Netmcore_mempool.unlink_mempool
  let stats = Netmcore_mempool.stats

  module H = Netmcore_heap
  module R = Netmcore_ref
end

module Ours : IMPL = struct
  let name = "shmpool"
  let create_mempool n = Shmpool_netmcore.Netmcore_mempool.create_mempool n
  let unlink_mempool = Shmpool_netmcore.Netmcore_mempool.unlink_mempool
  let stats = Shmpool_netmcore.Netmcore_mempool.stats

  module H = Shmpool_netmcore.Netmcore_heap
  module R = Shmpool_netmcore.Netmcore_ref
end

let made = ref []
let () = at_exit (fun () -> List.iter (fun f -> try f () with _ -> ()) !made)

let init_failure = Failure "Netsys_mem.init_value: Library error"

(* Results both implementations must agree on. *)
module Common (I : IMPL) = struct
  let pool () =
    let id = I.create_mempool (8 * 1024 * 1024) in
    made := (fun () -> I.unlink_mempool id) :: !made;
    id

  let t_basic () =
    let p = pool () in
    let h = I.H.create_heap p 4096 (ref [ 1; 2; 3 ]) in
    Alcotest.(check (list int)) "root" [ 1; 2; 3 ] !(I.H.root h);
    let h2 = I.H.heap_of_descr p (I.H.descr_of_heap h) in
    I.H.modify h2 (fun m -> I.H.root h2 := I.H.add m [ 4; 5 ]);
    Alcotest.(check (list int)) "modified via another handle" [ 4; 5 ] !(I.H.root h);
    I.H.modify h (fun m ->
        let s = I.H.add_string m 5 in
        Alcotest.(check int) "add_string length" 5 (String.length s);
        let a = I.H.add_uniform_array m 3 "x" in
        Alcotest.(check bool) "uniform: one copy" true (a.(0) == a.(2));
        let fa = I.H.add_uniform_array m 4 1.5 in
        Alcotest.(check (float 0.)) "float array" 1.5 fa.(3);
        Alcotest.(check int) "float array tag" Obj.double_array_tag (Obj.tag (Obj.repr fa));
        let ia = I.H.add_init_array m 4 (fun i -> string_of_int i) in
        Alcotest.(check (array string)) "init array" [| "0"; "1"; "2"; "3" |] ia;
        let fi = I.H.add_init_array m 3 float_of_int in
        Alcotest.(check (array (float 0.))) "init float array" [| 0.; 1.; 2. |] fi;
        let x = I.H.add m (7, "seven") in
        let o = I.H.add_some m x in
        Alcotest.(check bool) "add_some does not copy" true (match o with Some y -> y == x | None -> false);
        I.H.pin m o;
        Alcotest.(check int) "add int" 42 (I.H.add m 42);
        let shared = I.H.add m "s" in
        let p = I.H.add m (shared, shared) in
        Alcotest.(check bool) "sharing kept" true (fst p == snd p);
        let rec cyc = 1 :: 2 :: cyc in
        let c = I.H.add m cyc in
        Alcotest.(check bool) "cycle kept" true (List.tl (List.tl c) == c);
        let im = I.H.add_immutable m (x, 1) in
        Alcotest.(check bool) "add_immutable shares" true (fst im == x);
        let v = I.H.add m (1l, 2L, 3n, 4.5, [| 1.; 2. |], Bigarray.Array1.of_array Bigarray.int Bigarray.c_layout [| 9; 8 |]) in
        let a, b, c, d, e, f = v in
        Alcotest.(check bool) "customs and floats" true
          (a = 1l && b = 2L && c = 3n && d = 4.5 && e = [| 1.; 2. |] && f.{1} = 8));
    (* accepted by the original, so by ours *)
    I.H.modify h (fun m ->
        let t = Hashtbl.create 8 in
        Hashtbl.replace t "k" [ 1 ];
        let t' = I.H.add m t in
        Alcotest.(check (list int)) "Hashtbl.t" [ 1 ] (Hashtbl.find t' "k");
        let b = Buffer.create 8 in
        Buffer.add_string b "buf";
        Alcotest.(check string) "Buffer.t" "buf" (Buffer.contents (I.H.add m b));
        ignore (I.H.add m (Netmcore_mutex.dummy ()));
        ignore (I.H.add m (Netmcore_sem.dummy ()));
        Alcotest.(check bool) "[||]" true (I.H.add_immutable m [| "x" |] = [| "x" |]);
        Alcotest.(check bool) "forced lazy" true (I.H.add m (Lazy.from_val "v") |> Lazy.force = "v"));
    Alcotest.(check int) "with_value" 2
      (I.H.with_value h (fun () -> !(I.H.root h)) List.length);
    Alcotest.(check string) "copy" "abc" (I.H.copy "abc");
    Alcotest.(check int) "copy int" 3 (I.H.copy 3);
    I.H.gc h;
    Alcotest.(check (list int)) "root after gc" [ 4; 5 ] !(I.H.root h);
    I.H.destroy h

  let t_errors () =
    let p = pool () in
    let h = I.H.create_heap p 4096 (ref "") in
    let refused = [ Obj.repr (fun x -> x + 1); Obj.repr (object end); Obj.repr stdin;
                    Obj.repr (lazy (print_string "")); Obj.repr Not_found ] in
    List.iter
      (fun v ->
        Alcotest.check_raises "uncopyable" init_failure (fun () ->
            I.H.modify h (fun m -> ignore (I.H.add m v))))
      refused;
    Alcotest.check_raises "root not a block"
      (Failure "Netmcore_heap.create_heap: the root element is not a block") (fun () ->
        ignore (I.H.create_heap p 4096 5));
    Alcotest.check_raises "bad size" (Invalid_argument "Netmcore_mempool.alloc_mem: bad size")
      (fun () -> ignore (I.H.create_heap p 0 (ref 1)));
    let s = I.stats p in
    Alcotest.check_raises "uncopyable root" init_failure (fun () ->
        ignore (I.H.create_heap p 4096 (ref (fun () -> ()))));
    Alcotest.(check (triple int int int)) "refused root: pool unchanged" s (I.stats p);
    let escaped = I.H.modify h Fun.id in
    Alcotest.check_raises "escaped mutator" (Failure "Netmcore_heap.add: invalid mutator")
      (fun () -> ignore (I.H.add escaped "x"));
    Alcotest.check_raises "exception releases the lock" Exit (fun () ->
        I.H.modify h (fun _ -> raise Exit));
    I.H.modify h (fun m -> I.H.root h := I.H.add m "after");
    Alcotest.check_raises "copy of a closure" (Failure "Netsys_mem.copy_value: Library error")
      (fun () -> ignore (Sys.opaque_identity (I.H.copy (fun () -> ())) : unit -> unit));
    Alcotest.(check string) "still works" "after" !(I.H.root h);
    I.H.destroy h;
    Alcotest.check_raises "destroy twice" (Failure "Netmcore_mempool.free_mem: memory block not found")
      (fun () -> I.H.destroy h)

  let t_destroy_restores () =
    let p = pool () in
    let before = I.stats p in
    let h = I.H.create_heap p 100 (ref []) in
    for i = 1 to 2000 do
      I.H.modify h (fun m -> I.H.root h := I.H.add m (List.init 50 (fun k -> string_of_int (i + k))))
    done;
    I.H.gc h;
    I.H.destroy h;
    Alcotest.(check (triple int int int)) "stats restored" before (I.stats p)

  let t_ref () =
    let p = pool () in
    let r = I.R.sref p [ "a" ] in
    Alcotest.(check (list string)) "deref_ro" [ "a" ] (I.R.deref_ro r);
    I.R.assign r [ "b"; "c" ];
    Alcotest.(check (list string)) "assign" [ "b"; "c" ] (I.R.deref_ro r);
    Alcotest.(check int) "deref_p" 2 (I.R.deref_p r List.length);
    let c = I.R.deref_c r in
    Alcotest.(check (list string)) "deref_c" [ "b"; "c" ] c;
    Alcotest.check_raises "assign closure" init_failure (fun () ->
        I.R.assign (Obj.magic r) (fun () -> ()));
    Alcotest.(check (list string)) "old value kept" [ "b"; "c" ] (I.R.deref_ro r);
    let h = I.R.heap r in
    I.H.gc h;
    I.H.destroy h

  (* A full pool raises the very Out_of_pool_memory of OCamlnet's pool,
     and the heap stays usable. *)
  let t_full () =
    let id = I.create_mempool (1024 * 1024) in
    made := (fun () -> I.unlink_mempool id) :: !made;
    let h = I.H.create_heap id 4096 (ref "") in
    Alcotest.check_raises "Out_of_pool_memory" Netmcore_mempool.Out_of_pool_memory (fun () ->
        I.H.modify h (fun m -> I.H.root h := I.H.add m (String.make (2 * 1024 * 1024) 'x')));
    I.H.modify h (fun m -> I.H.root h := I.H.add m "small");
    Alcotest.(check string) "still usable" "small" !(I.H.root h);
    I.H.destroy h

  let tests =
    [
      Alcotest.test_case (I.name ^ ": full pool") `Quick t_full;
      Alcotest.test_case (I.name ^ ": every function") `Quick t_basic;
      Alcotest.test_case (I.name ^ ": errors") `Quick t_errors;
      Alcotest.test_case (I.name ^ ": destroy restores the pool") `Quick t_destroy_restores;
      Alcotest.test_case (I.name ^ ": Netmcore_ref") `Quick t_ref;
    ]
end

module CO = Common (Orig)
module CS = Common (Ours)
module H = Shmpool_netmcore.Netmcore_heap
module R = Shmpool_netmcore.Netmcore_ref

let pool () =
  let id = Shmpool_netmcore.Netmcore_mempool.create_mempool (64 * 1024 * 1024) in
  made := (fun () -> Shmpool_netmcore.Netmcore_mempool.unlink_mempool id) :: !made;
  id

(* OCamlnet's values die at the first compaction here (its headers are
   white); ours are black and survive any number. *)
let t_compaction () =
  let p = pool () in
  let r = R.sref p "" in
  let held = ref [] in
  let c0 = (Gc.quick_stat ()).Gc.compactions in
  for i = 1 to 3000 do
    R.assign r (String.make 10_000 (Char.chr (65 + (i mod 26))));
    let v = R.deref_ro r in
    held := v :: (match !held with a :: b :: _ -> [ a; b ] | l -> l);
    if i mod 300 = 0 then Gc.compact () else if i mod 50 = 0 then Gc.full_major ();
    (* private garbage: pressure on the private heap *)
    ignore (Sys.opaque_identity (Array.make 1000 (string_of_int i)))
  done;
  Alcotest.(check bool) "compactions happened" true ((Gc.quick_stat ()).Gc.compactions - c0 >= 10);
  Alcotest.(check int) "last value" 10_000 (String.length (R.deref_ro r));
  Alcotest.(check char) "content" (Char.chr (65 + (3000 mod 26))) (R.deref_ro r).[9999];
  (* The held values are the last three assigned; the one just replaced
     may be reclaimed by our GC (as documented), the current one not. *)
  Gc.compact ();
  Alcotest.(check bool) "held current value intact" true (List.hd !held == R.deref_ro r);
  R.(H.destroy (heap r))

(* The same with only automatic compactions (none requested): with
   max_overhead = 0 the runtime compacts at the end of every major cycle
   that allocation drives; heap values stay held in private data. The
   runtime never compacts automatically a major heap of at most two heap
   increments (compact.c, 4.13 and 4.14 alike): [ballast] (8 MB, live
   until the end) keeps the heap above that whatever ran before. Without
   it this test saw 1 automatic compaction in 200,000 iterations on 4.14
   (make test-ocaml414, its smaller heap at this point) and failed; with
   it the 5 it waits for come within a fraction of a second there too. *)
let t_auto_compaction () =
  let p = pool () in
  let r = R.sref p "" in
  let held = ref [] in
  let ballast = Array.make 1_000_000 0 in
  let saved = Gc.get () in
  Fun.protect ~finally:(fun () -> Gc.set saved) @@ fun () ->
  Gc.set { saved with Gc.max_overhead = 0; space_overhead = 40 };
  let c0 = (Gc.quick_stat ()).Gc.compactions in
  let i = ref 0 in
  while (Gc.quick_stat ()).Gc.compactions - c0 < 5 && !i < 200_000 do
    incr i;
    R.assign r (String.make 10_000 (Char.chr (65 + (!i mod 26))));
    let v = R.deref_ro r in
    held := v :: (match !held with a :: b :: _ -> [ a; b ] | l -> l);
    ignore (Sys.opaque_identity (Array.make 1000 (string_of_int !i)));
    (* every held value that is still the current one reads back intact *)
    if List.hd !held != R.deref_ro r || (List.hd !held).[9999] <> Char.chr (65 + (!i mod 26)) then
      Alcotest.failf "iteration %d: held value damaged" !i
  done;
  Gc.set saved;
  ignore (Sys.opaque_identity ballast);
  Alcotest.(check bool) "automatic compactions happened" true ((Gc.quick_stat ()).Gc.compactions - c0 >= 5);
  Alcotest.(check char) "content" (Char.chr (65 + (!i mod 26))) (R.deref_ro r).[9999];
  R.(H.destroy (heap r))

let t_reentrant () =
  let p = pool () in
  let h = H.create_heap p 4096 (ref 0) in
  H.modify h (fun _ ->
      H.modify h (fun m -> H.root h := H.add m 1);
      H.gc h);
  Alcotest.(check int) "nested modify" 1 !(H.root h);
  H.with_value h (fun () -> H.modify h (fun _ -> ()); !(H.root h)) ignore;
  let s0 = H.stats h in
  H.with_value h (fun () -> H.root h) (fun _ -> Alcotest.(check int) "pinned" 1 (H.stats h).H.pins);
  Alcotest.(check int) "pins released" s0.H.pins (H.stats h).H.pins;
  (try H.with_value h (fun () -> H.root h) (fun _ -> raise Exit) with Exit -> ());
  Alcotest.(check int) "pins released on exception" 0 (H.stats h).H.pins;
  Alcotest.(check string) "process may destroy the heap" "done"
    (H.with_value h (fun () -> H.root h) (fun _ -> H.destroy h; "done"));
  Alcotest.check_raises "destroyed" (Failure "Netmcore_heap: heap destroyed") (fun () ->
      ignore (H.root h))

let t_additions_survive () =
  let p = pool () in
  let h = H.create_heap p 100 (ref []) in
  H.modify h (fun m ->
      let x = H.add m (List.init 100 string_of_int) in
      (* enough garbage to run our GC several times *)
      for _ = 1 to 2000 do
        ignore (H.add m (List.init 20 string_of_int))
      done;
      H.gc h;
      Alcotest.(check (list string)) "unattached addition intact" (List.init 100 string_of_int) x;
      H.root h := x);
  H.gc h;
  let s = H.stats h in
  Alcotest.(check bool) "garbage reclaimed after modify" true (s.H.live_words < 1000);
  H.destroy h

let no_heap = Failure "Netmcore_heap.heap_of_descr: no heap structure found at this address"

let t_bad_descr () =
  let p = pool () in
  let h = H.create_heap p (H.minimum_size (ref "abc")) (ref "abc") in
  Alcotest.(check string) "minimum_size is enough" "abc" !(H.root h);
  let d = H.descr_of_heap h in
  let bad : string ref H.descr list = [ Obj.magic 0; Obj.magic 12345; Obj.magic (-8); Obj.magic ((Obj.magic d : int) + 4096) ] in
  let s = Shmpool_netmcore.Netmcore_mempool.stats p in
  List.iter (fun b -> Alcotest.check_raises "bad descriptor" no_heap (fun () -> ignore (H.heap_of_descr p b))) bad;
  (* a plain pool block is no heap either *)
  let m = Shmpool_netmcore.Netmcore_mempool.alloc_mem p 8192 in
  let base = match (Netmcore.get_resource p)#repr with
    | `Posix_shm_preallocated_sc (_, mem, _) -> Netsys_mem.memory_address mem | _ -> assert false in
  let off : string ref H.descr = Obj.magic (Nativeint.to_int (Nativeint.sub (Netsys_mem.memory_address m) base)) in
  Alcotest.check_raises "a block without a heap" no_heap (fun () -> ignore (H.heap_of_descr p off));
  Shmpool_netmcore.Netmcore_mempool.free_mem p m;
  Alcotest.(check (triple int int int)) "pool unchanged" s (Shmpool_netmcore.Netmcore_mempool.stats p);
  H.destroy h;
  Alcotest.check_raises "destroyed heap's descriptor" no_heap (fun () -> ignore (H.heap_of_descr p d))

(* Two systhreads modify one heap: a thread waiting for the heap's lock
   releases the runtime lock, so the holder (which yields inside modify)
   can finish. *)
let t_threads () =
  let p = pool () in
  let h = H.create_heap p 4096 (ref 0) in
  let worker () =
    for _ = 1 to 2000 do
      H.modify h (fun m ->
          let v = !(H.root h) in
          Thread.yield ();
          H.root h := H.add m (v + 1))
    done
  in
  let ts = List.init 2 (fun _ -> Thread.create worker ()) in
  List.iter Thread.join ts;
  Alcotest.(check int) "no lost update" 4000 !(H.root h);
  H.destroy h

(* Debug.enable reports a private value stored into the heap (a program
   error the types cannot catch). *)
let t_debug_escape () =
  let p = pool () in
  let h = H.create_heap p 4096 (ref [ "shared" ]) in
  let logged = ref [] in
  let saved = !Netlog.Debug.current_dlogger in
  Netlog.Debug.current_dlogger := (fun m msg -> if m = "Netmcore_heap" then logged := msg :: !logged);
  H.Debug.enable := true;
  Fun.protect
    ~finally:(fun () ->
      H.Debug.enable := false;
      Netlog.Debug.current_dlogger := saved)
    (fun () ->
      H.modify h (fun m -> H.root h := H.add m [ "fine" ]);
      Alcotest.(check int) "nothing to report" 0 (List.length !logged);
      let private_list = [ String.make 3 'p' ] in
      H.modify h (fun _ -> H.root h := private_list);
      H.modify h (fun m -> H.root h := H.add m [ "repaired" ]);
      Alcotest.(check bool) "escape reported" true
        (List.exists
           (fun s -> String.length s > 20 && String.sub s 0 20 = "modify stored a priv")
           !logged));
  H.destroy h

(* A process killed inside modify: the next locker recovers the heap, and
   Heap_internal.modify_repairing runs its structure's repair exactly once
   (whoever calls it first after the recovery). *)
let t_repair_hook () =
  let p = pool () in
  let h = H.create_heap p 4096 (ref [ 1; 2; 3 ]) in
  let repairs = ref 0 in
  let repairing f = Shmpool_netmcore.Heap_internal.modify_repairing h ~repair:(fun _ -> incr repairs) f in
  repairing (fun m -> H.root h := H.add m [ 4; 5 ]);
  Alcotest.(check int) "no repair before any death" 0 !repairs;
  (match Unix.fork () with
  | 0 ->
      H.modify h (fun m ->
          ignore (H.add m (List.init 1000 Fun.id));
          Unix.kill (Unix.getpid ()) Sys.sigkill);
      Unix._exit 3
  | pid -> (
      match Unix.waitpid [] pid with
      | _, Unix.WSIGNALED s when s = Sys.sigkill -> ()
      | _ -> Alcotest.fail "the child was not killed inside modify"));
  repairing (fun m -> H.root h := H.add m (6 :: !(H.root h)));
  Alcotest.(check int) "repaired once after the recovery" 1 !repairs;
  Alcotest.(check (list int)) "root: last committed value" [ 6; 4; 5 ] !(H.root h);
  Alcotest.(check int) "one recovery" 1 (H.stats h).H.recoveries;
  repairing ignore;
  Alcotest.(check int) "not again" 1 !repairs;
  H.destroy h

(* The mutations OCamlnet allows inside modify (heap values into heap
   fields, unboxed stores into heap strings and float arrays), then heap
   values held in private data through full majors and compactions under
   private allocation pressure. *)
type rec_t = {
  mutable name : string;
  mutable items : string list;
  mutable x : float;
  tbl : int array;
  mutable arr : string array;
  mutable fl : float array;
}

let t_mutations () =
  let p = pool () in
  let h = H.create_heap p 4096 { name = "a"; items = []; x = 0.; tbl = Array.make 10 0; arr = [||]; fl = [||] } in
  (* (values must be reachable from the root once modify returns) *)
  H.modify h (fun m ->
      (H.root h).arr <- H.add_uniform_array m 50 "";
      (H.root h).fl <- H.add_init_array m 20 float_of_int);
  let arr = (H.root h).arr and fl = (H.root h).fl in
  let held = ref [] in
  (* and the escape check sees nothing wrong in any of it *)
  let logged = ref 0 in
  let saved = !Netlog.Debug.current_dlogger in
  Netlog.Debug.current_dlogger := (fun m _ -> if m = "Netmcore_heap" then incr logged);
  H.Debug.enable := true;
  Fun.protect ~finally:(fun () -> H.Debug.enable := false; Netlog.Debug.current_dlogger := saved) @@ fun () ->
  for i = 1 to 300 do
    H.modify h (fun m ->
        let r = H.root h in
        r.name <- H.add m (Printf.sprintf "name %d" i);
        (* a whole new list (cons cells built here are private: only
           values add returns may be stored), sharing the old strings *)
        r.items <-
          H.add_immutable m (string_of_int i :: (match r.items with a :: b :: _ -> [ a; b ] | l -> l));
        r.x <- H.add m (float i);  (* a boxed float field: a heap value *)
        r.tbl.(i mod 10) <- i;
        arr.(i mod 50) <- H.add m (String.make (i mod 17) 'z');
        fl.(i mod 20) <- float (i * 2);
        let s = H.add_string m 8 in
        Bytes.set (Bytes.unsafe_of_string s) 0 'q';
        arr.(49) <- s;
        H.pin m s);
    held := (H.root h).name :: (match !held with a :: b :: _ -> [ a; b ] | l -> l);
    ignore (Sys.opaque_identity (Array.make 2000 (string_of_int i)));
    if i mod 50 = 0 then (H.gc h; Gc.compact ()) else if i mod 10 = 0 then Gc.full_major ()
  done;
  let r = H.root h in
  Alcotest.(check string) "name" "name 300" r.name;
  Alcotest.(check (list string)) "items" [ "300"; "299"; "298" ] r.items;
  Alcotest.(check (float 0.)) "float field" 300. r.x;
  Alcotest.(check int) "int array" 300 r.tbl.(0);
  Alcotest.(check string) "array of heap strings" (String.make (298 mod 17) 'z') arr.(298 mod 50);
  Alcotest.(check string) "heap string written in place" "q" (String.sub arr.(49) 0 1);
  Alcotest.(check (float 0.)) "float array" 598. fl.(299 mod 20);
  Alcotest.(check bool) "held value is the current one" true (List.hd !held == r.name);
  Alcotest.(check string) "held value intact" "name 300" (List.hd !held);
  Alcotest.(check int) "no escape reported" 0 !logged;
  H.destroy h

(* qcheck model of heap contents through the OCaml API: random stores of
   new lists, shared parts (add_immutable), arrays, clears, GCs and
   with_value reads; after each step the heap's root equals the model. *)
type mop =
  | Set of int * (int * string) list
  | Share of int * int
  | Arr of int * int
  | Clear of int
  | Collect
  | Read of int

let mop_gen =
  let open QCheck.Gen in
  let slot = int_bound 5 in
  frequency
    [
      (4, map2 (fun i l -> Set (i, l)) slot (list_size (int_bound 30) (pair small_int (string_size ~gen:printable (int_bound 12)))));
      (2, map2 (fun i j -> Share (i, j)) slot slot);
      (1, map2 (fun i n -> Arr (i, n)) slot (int_bound 20));
      (1, map (fun i -> Clear i) slot);
      (1, return Collect);
      (2, map (fun i -> Read i) slot);
    ]

let show_mop = function
  | Set (i, l) -> Printf.sprintf "Set %d (%d)" i (List.length l)
  | Share (i, j) -> Printf.sprintf "Share %d %d" i j
  | Arr (i, n) -> Printf.sprintf "Arr %d %d" i n
  | Clear i -> Printf.sprintf "Clear %d" i
  | Collect -> "Collect"
  | Read i -> Printf.sprintf "Read %d" i

let t_qcheck_model () =
  let p = pool () in
  let test =
    QCheck.Test.make ~count:60 ~name:"heap contents follow the model"
      (QCheck.make ~print:(fun ops -> String.concat "; " (List.map show_mop ops)) QCheck.Gen.(list_size (int_bound 40) mop_gen))
      (fun ops ->
        let h = H.create_heap p 4096 (Array.make 6 []) in
        let model = Array.make 6 [] in
        let ok =
          List.for_all
            (fun op ->
              (match op with
              | Set (i, l) ->
                  H.modify h (fun m -> (H.root h).(i) <- H.add m l);
                  model.(i) <- l
              | Share (i, j) ->
                  H.modify h (fun m -> (H.root h).(i) <- H.add_immutable m ((0, "s") :: (H.root h).(j)));
                  model.(i) <- (0, "s") :: model.(j)
              | Arr (i, n) ->
                  let a = H.modify h (fun m ->
                    let a = H.add_init_array m n (fun k -> (k, string_of_int k)) in
                    (H.root h).(i) <- H.add_immutable m (Array.to_list a);
                    a) in
                  ignore a;
                  model.(i) <- List.init n (fun k -> (k, string_of_int k))
              | Clear i ->
                  H.modify h (fun _ -> (H.root h).(i) <- []);
                  model.(i) <- []
              | Collect -> H.gc h
              | Read i ->
                  if H.with_value h (fun () -> (H.root h).(i)) (fun l -> H.copy l) <> model.(i) then
                    failwith "with_value read differs");
              H.copy (H.root h) = model)
            ops
        in
        H.gc h;
        H.destroy h;
        ok)
  in
  let before = Shmpool_netmcore.Netmcore_mempool.stats p in
  QCheck.Test.check_exn test;
  Alcotest.(check (triple int int int)) "every heap destroyed: pool as before" before
    (Shmpool_netmcore.Netmcore_mempool.stats p)

(* An asynchronous exception (a signal handler raising) inside modify
   releases the lock like any other exception. *)
let t_async_exception () =
  let p = pool () in
  let h = H.create_heap p 4096 (ref 0) in
  let old = Sys.signal Sys.sigusr1 (Sys.Signal_handle (fun _ -> raise Exit)) in
  Fun.protect ~finally:(fun () -> Sys.set_signal Sys.sigusr1 old) (fun () ->
      for i = 1 to 200 do
        try
          H.modify h (fun m ->
              H.root h := H.add m i;
              Unix.kill (Unix.getpid ()) Sys.sigusr1;
              (* the handler runs at the next poll point, at the latest here *)
              for _ = 1 to 1000 do
                ignore (Sys.opaque_identity (ref i))
              done)
        with Exit -> ()
      done);
  (* the lock is free: another thread can take it *)
  let t = Thread.create (fun () -> H.modify h (fun m -> H.root h := H.add m (-1))) () in
  Thread.join t;
  Alcotest.(check int) "usable after 200 asynchronous exceptions" (-1) !(H.root h);
  H.destroy h

let () =
  Alcotest.run "netmcore_heap"
    [
      ("original", CO.tests);
      ("ours", CS.tests);
      ( "ours only",
        [
          Alcotest.test_case "Gc.compact with heap values held" `Quick t_compaction;
          Alcotest.test_case "automatic compactions with heap values held" `Quick t_auto_compaction;
          Alcotest.test_case "re-entrance and pins" `Quick t_reentrant;
          Alcotest.test_case "additions live until modify returns" `Quick t_additions_survive;
          Alcotest.test_case "bad descriptors" `Quick t_bad_descr;
          Alcotest.test_case "two systhreads" `Quick t_threads;
          Alcotest.test_case "Debug reports private values stored" `Quick t_debug_escape;
          Alcotest.test_case "death in modify: recovery and repair hook" `Quick t_repair_hook;
          Alcotest.test_case "mutations inside modify, then compactions" `Quick t_mutations;
          Alcotest.test_case "qcheck model of heap contents" `Quick t_qcheck_model;
          Alcotest.test_case "asynchronous exceptions in modify" `Quick t_async_exception;
        ] );
    ]
