(* Shmpool_netmcore.Netmcore_array, _hashtbl and _queue in one process:
   the exact signatures, differential runs of the same random operations
   on both implementations (same results, exceptions and iteration
   order), and qcheck model tests of ours against Stdlib's Array, Hashtbl
   and Queue over thousands of random operations. Workers and kills:
   test_structs_workers.ml. *)

(* The compatibility contract: these lines compiling are the test. *)
module _ : Struct_sigs.ARRAY = Shmpool_netmcore.Netmcore_array
module _ : Struct_sigs.HASHTBL = Shmpool_netmcore.Netmcore_hashtbl
module _ : Struct_sigs.QUEUE = Shmpool_netmcore.Netmcore_queue

(* The operations the tests use, on either implementation. *)
module type IMPL = sig
  val name : string
  val create_mempool : int -> Netmcore.res_id
  val shm_name : Netmcore.res_id -> string
  val unlink_mempool : Netmcore.res_id -> unit

  module A : sig
    type ('e, 'h) sarray

    val create : Netmcore.res_id -> 'e array -> 'h -> ('e, 'h) sarray
    val make : Netmcore.res_id -> int -> 'e -> 'h -> ('e, 'h) sarray
    val init : Netmcore.res_id -> int -> (int -> 'e) -> 'h -> ('e, 'h) sarray
    val grow : ('e, _) sarray -> int -> 'e -> unit
    val set : ('e, _) sarray -> int -> 'e -> unit
    val get_ro : ('e, _) sarray -> int -> 'e
    val get_p : ('e, _) sarray -> int -> ('e -> 'a) -> 'a
    val get_c : ('e, _) sarray -> int -> 'e
    val length : (_, _) sarray -> int
    val header : (_, 'h) sarray -> 'h
    val deref : ('e, _) sarray -> 'e array
  end

  module T : sig
    type ('a, 'b, 'h) t

    val create : Netmcore.res_id -> 'h -> ('a, 'b, 'h) t
    val clear : ('a, 'b, 'h) t -> unit
    val add : ('a, 'b, 'h) t -> 'a -> 'b -> unit
    val find_ro : ('a, 'b, 'h) t -> 'a -> 'b
    val find_p : ('a, 'b, 'h) t -> 'a -> ('b -> 'r) -> 'r
    val find_c : ('a, 'b, 'h) t -> 'a -> 'b
    val find_all_ro : ('a, 'b, 'h) t -> 'a -> 'b list
    val find_all_p : ('a, 'b, 'h) t -> 'a -> ('b list -> 'r) -> 'r
    val find_all_c : ('a, 'b, 'h) t -> 'a -> 'b list
    val mem_ro : ('a, 'b, 'h) t -> 'a -> bool
    val mem : ('a, 'b, 'h) t -> 'a -> bool
    val remove : ('a, 'b, 'h) t -> 'a -> unit
    val replace : ('a, 'b, 'h) t -> 'a -> 'b -> unit
    val iter : ('a -> 'b -> unit) -> ('a, 'b, 'h) t -> unit
    val length : ('a, 'b, 'h) t -> int
    val header : ('a, 'b, 'h) t -> 'h
  end

  module Q : sig
    type ('e, 'h) squeue

    exception Empty

    val create : Netmcore.res_id -> 'h -> ('e, 'h) squeue
    val push : 'e -> ('e, 'h) squeue -> unit
    val pop_p : ('e, 'h) squeue -> ('e -> 'a) -> 'a
    val pop_c : ('e, 'h) squeue -> 'e
    val top_p : ('e, 'h) squeue -> ('e -> 'a) -> 'a
    val top_c : ('e, 'h) squeue -> 'e
    val clear : ('e, 'h) squeue -> unit
    val is_empty : ('e, 'h) squeue -> bool
    val length : ('e, 'h) squeue -> int
    val iter : ('e -> unit) -> ('e, 'h) squeue -> unit
    val fold : ('a -> 'e -> 'a) -> 'a -> ('e, 'h) squeue -> 'a
    val header : ('e, 'h) squeue -> 'h
  end
end

module Orig : IMPL = struct
  let name = "ocamlnet"
  let create_mempool n = Netmcore_mempool.create_mempool n
  let shm_name = Netmcore_mempool.shm_name
  let unlink_mempool = Netmcore_mempool.unlink_mempool

  module A = Netmcore_array
  module T = Netmcore_hashtbl
  module Q = Netmcore_queue
end

module Ours : IMPL = struct
  let name = "shmpool"
  let create_mempool n = Shmpool_netmcore.Netmcore_mempool.create_mempool n
  let shm_name = Shmpool_netmcore.Netmcore_mempool.shm_name
  let unlink_mempool = Shmpool_netmcore.Netmcore_mempool.unlink_mempool

  module A = Shmpool_netmcore.Netmcore_array
  module T = Shmpool_netmcore.Netmcore_hashtbl
  module Q = Shmpool_netmcore.Netmcore_queue
end

let made = ref []
let () = at_exit (fun () -> List.iter (fun f -> try f () with _ -> ()) !made)

let exn_name = function
  | Not_found -> "Not_found"
  | Invalid_argument s -> "Invalid_argument " ^ s
  | Netmcore_queue.Empty | Shmpool_netmcore.Netmcore_queue.Empty -> "Empty"
  | e -> Printexc.to_string e

let try_ f = match f () with s -> s | exception e -> "!" ^ exn_name e
let str_list l = "[" ^ String.concat ";" l ^ "]"

(* A trace of results of a random sequence of operations (seeded, so both
   implementations see the same sequence). *)
module Trace (I : IMPL) = struct
  let pool () =
    let id = I.create_mempool (64 * 1024 * 1024) in
    made := (fun () -> I.unlink_mempool id) :: !made;
    Testutil.log_pool (I.shm_name id);
    id

  let hashtbl seed n =
    let p = pool () in
    let rnd = Random.State.make [| seed |] in
    let t = I.T.create p "hdr" in
    let key () = "k" ^ string_of_int (Random.State.int rnd 1000) in
    let out = Buffer.create 4096 in
    for i = 1 to n do
      let k = key () in
      let r =
        match Random.State.int rnd 12 with
        | 0 | 1 | 2 | 3 -> I.T.add t k (string_of_int i); "add"
        | 4 -> I.T.replace t k (string_of_int i); "replace"
        | 5 -> I.T.remove t k; "remove"
        | 6 -> try_ (fun () -> I.T.find_c t k)
        | 7 -> try_ (fun () -> I.T.find_ro t k ^ I.T.find_p t k String.uppercase_ascii)
        | 8 -> str_list (I.T.find_all_c t k) ^ str_list (I.T.find_all_ro t k) ^ I.T.find_all_p t k str_list
        | 9 -> string_of_bool (I.T.mem t k) ^ string_of_bool (I.T.mem_ro t k)
        | 10 -> string_of_int (I.T.length t)
        | _ -> if Random.State.int rnd 2000 = 0 then (I.T.clear t; "clear") else I.T.header t
      in
      Buffer.add_string out r;
      Buffer.add_char out '\n'
    done;
    (* iteration order included *)
    I.T.iter (fun k v -> Buffer.add_string out (k ^ "=" ^ v ^ ",")) t;
    Buffer.contents out

  let queue seed n =
    let p = pool () in
    let rnd = Random.State.make [| seed |] in
    let q = I.Q.create p 7 in
    let out = Buffer.create 4096 in
    for i = 1 to n do
      let r =
        match Random.State.int rnd 10 with
        | 0 | 1 | 2 | 3 -> I.Q.push (string_of_int i, [ i ]) q; "push"
        | 4 -> try_ (fun () -> fst (I.Q.pop_c q))
        | 5 -> try_ (fun () -> I.Q.pop_p q fst)
        | 6 -> try_ (fun () -> fst (I.Q.top_c q) ^ I.Q.top_p q fst)
        | 7 -> string_of_int (I.Q.length q) ^ string_of_bool (I.Q.is_empty q)
        | 8 -> str_list (I.Q.fold (fun acc (s, _) -> s :: acc) [] q)
        | _ ->
            if Random.State.int rnd 50 = 0 then (I.Q.clear q; "clear")
            else (
              let l = ref [] in
              I.Q.iter (fun (s, _) -> l := s :: !l) q;
              str_list !l ^ string_of_int (I.Q.header q))
      in
      Buffer.add_string out r;
      Buffer.add_char out '\n'
    done;
    Buffer.contents out

  let array seed n =
    let p = pool () in
    let rnd = Random.State.make [| seed |] in
    let a = I.A.create p [| "a"; "b"; "c" |] "h" in
    let f = I.A.make p 2 1.5 () in
    let g = I.A.init p 5 (fun i -> [ i ]) () in
    let out = Buffer.create 4096 in
    for i = 1 to n do
      let k = Random.State.int rnd 40 - 3 in
      let r =
        match Random.State.int rnd 8 with
        | 0 | 1 -> try_ (fun () -> I.A.set a k (string_of_int i); "set")
        | 2 -> try_ (fun () -> I.A.get_ro a k ^ I.A.get_p a k String.uppercase_ascii ^ I.A.get_c a k)
        | 3 -> I.A.grow a (Random.State.int rnd 40) "g"; string_of_int (I.A.length a)
        | 4 -> try_ (fun () -> I.A.set f k (float i); string_of_float (I.A.get_ro f k))
        | 5 -> I.A.grow f (Random.State.int rnd 40) 0.25; string_of_float (Array.fold_left ( +. ) 0. (I.A.deref f))
        | 6 -> try_ (fun () -> I.A.set g k [ i; i ]; string_of_int (List.length (I.A.get_c g k)))
        | _ -> String.concat "," (Array.to_list (I.A.deref a)) ^ I.A.header a
      in
      Buffer.add_string out r;
      Buffer.add_char out '\n'
    done;
    Buffer.contents out
end

module T_orig = Trace (Orig)
module T_ours = Trace (Ours)

(* Each side runs in a child process of its own (Testutil.isolated): a
   crash names its side; one of ours fails the test, one of OCamlnet's
   (4.1.9 crashes in places) is reported at the end of the run and that
   seed is not compared. The occasional segfault of this test when both
   sides ran in one process was OCamlnet's: 5 crashes in 165 runs of that
   version, each core dump in OCamlnet's Netmcore_queue.iter (under its
   Netmcore_heap.with_value_n), none in ours; 400 runs of this version
   crashed on neither side. SHMPOOL_DIFF_OPS (default 8000) and
   SHMPOOL_DIFF_SEEDS (default 5) shrink or grow the runs, for loops that
   hunt rare crashes. *)
let env_int name d = match Sys.getenv_opt name with Some s -> (try int_of_string s with Failure _ -> d) | None -> d

let differential name f_orig f_ours =
  Alcotest.test_case name `Quick (fun () ->
      let ops = env_int "SHMPOOL_DIFF_OPS" 8000 in
      let first = env_int "SHMPOOL_DIFF_FIRST" 1 in
      for seed = first to first + env_int "SHMPOOL_DIFF_SEEDS" 5 - 1 do
        (* OCamlnet's side crashes now and then (seen: a segfault in its
           Netmcore_heap.add under Netmcore_queue.push): noted, and retried
           a few times so the seed is still compared *)
        let rec orig k =
          match Testutil.isolated (fun () -> f_orig seed ops) with
          | Testutil.Crashed how when k > 1 ->
              Testutil.note "%s seed %d: OCamlnet's side %s; run again" name seed how;
              orig (k - 1)
          | r -> r
        in
        let a = orig 3 in
        let b = Testutil.isolated (fun () -> f_ours seed ops) in
        Testutil.compare_traces ~what:(Printf.sprintf "%s seed %d" name seed) a b
      done)

(* Model tests: ours against Stdlib. *)
module O = Ours

let pool = lazy (O.create_mempool (64 * 1024 * 1024) |> fun p -> made := (fun () -> O.unlink_mempool p) :: !made; p)

type hop = Add of int * int | Replace of int * int | Remove of int | Find of int | Clear

let hop_gen =
  QCheck.Gen.(
    let k = int_bound 100 in
    frequency
      [ (5, map2 (fun k v -> Add (k, v)) k nat); (3, map2 (fun k v -> Replace (k, v)) k nat);
        (3, map (fun k -> Remove k) k); (3, map (fun k -> Find k) k); (1, return Clear) ])

let model_hashtbl =
  QCheck.Test.make ~count:20 ~name:"hashtbl = Stdlib.Hashtbl"
    QCheck.(make Gen.(list_size (int_range 500 3000) hop_gen))
    (fun ops ->
      let t = O.T.create (Lazy.force pool) () and m = Hashtbl.create 16 in
      let ok = ref true in
      List.iter
        (fun op ->
          (match op with
          | Add (k, v) -> O.T.add t (string_of_int k) [ v ]; Hashtbl.add m (string_of_int k) [ v ]
          | Replace (k, v) -> O.T.replace t (string_of_int k) [ v ]; Hashtbl.replace m (string_of_int k) [ v ]
          | Remove k -> O.T.remove t (string_of_int k); Hashtbl.remove m (string_of_int k)
          | Find k ->
              let k = string_of_int k in
              let a = try Some (O.T.find_c t k) with Not_found -> None in
              let b = Hashtbl.find_opt m k in
              if a <> b || O.T.find_all_c t k <> Hashtbl.find_all m k || O.T.mem t k <> Hashtbl.mem m k then ok := false
          | Clear -> O.T.clear t; Hashtbl.clear m);
          if O.T.length t <> Hashtbl.length m then ok := false)
        ops;
      let collect it = let l = ref [] in it (fun k v -> l := (k, v) :: !l); List.stable_sort compare !l in
      let per_key it = let h = Hashtbl.create 16 in it (fun k v -> Hashtbl.replace h k (v :: (try Hashtbl.find h k with Not_found -> []))); List.sort compare (Hashtbl.fold (fun k v a -> (k, v) :: a) h []) in
      !ok && collect (fun f -> O.T.iter f t) = collect (fun f -> Hashtbl.iter f m)
      && per_key (fun f -> O.T.iter f t) = per_key (fun f -> Hashtbl.iter f m))

type qop = Push of int | Pop | Top | Len | Iter | QClear

let model_queue =
  QCheck.Test.make ~count:20 ~name:"queue = Stdlib.Queue"
    QCheck.(make Gen.(list_size (int_range 500 3000) (frequency [ (5, map (fun v -> Push v) nat); (4, return Pop); (1, return Top); (1, return Len); (1, return Iter); (1, map (fun b -> if b = 0 then QClear else Len) (int_bound 20)) ])))
    (fun ops ->
      let q = O.Q.create (Lazy.force pool) () and m = Queue.create () in
      List.for_all
        (fun op ->
          match op with
          | Push v -> O.Q.push (string_of_int v) q; Queue.push (string_of_int v) m; true
          | Pop ->
              let a = try Some (O.Q.pop_p q (fun s -> s ^ "")) with O.Q.Empty -> None in
              let b = try Some (Queue.pop m) with Queue.Empty -> None in
              a = b
          | Top -> (try Some (O.Q.top_c q) with O.Q.Empty -> None) = Queue.peek_opt m
          | Len -> O.Q.length q = Queue.length m && O.Q.is_empty q = Queue.is_empty m
          | Iter -> O.Q.fold (fun a x -> x :: a) [] q = Queue.fold (fun a x -> x :: a) [] m
          | QClear -> O.Q.clear q; Queue.clear m; true)
        ops)

type aop = Set of int * int | Get of int | Grow of int

let model_array =
  QCheck.Test.make ~count:20 ~name:"array = Stdlib.Array"
    QCheck.(make Gen.(list_size (int_range 500 3000) (frequency [ (4, map2 (fun k v -> Set (k, v)) (int_range (-2) 60) nat); (4, map (fun k -> Get k) (int_range (-2) 60)); (1, map (fun n -> Grow n) (int_bound 64)) ])))
    (fun ops ->
      let a = O.A.init (Lazy.force pool) 3 (fun i -> [ i ]) () and m = ref (Array.init 3 (fun i -> [ i ])) in
      let res f = match f () with x -> Ok x | exception Invalid_argument s -> Error s in
      List.for_all
        (fun op ->
          match op with
          | Set (k, v) -> res (fun () -> O.A.set a k [ v ]) = res (fun () -> !m.(k) <- [ v ])
          | Get k -> res (fun () -> O.A.get_c a k) = res (fun () -> !m.(k)) && (k < 0 || k >= Array.length !m || O.A.get_ro a k = !m.(k))
          | Grow n ->
              O.A.grow a n [ -1 ];
              if n > Array.length !m then m := Array.append !m (Array.make (n - Array.length !m) [ -1 ]);
              O.A.length a = Array.length !m && Array.to_list (O.A.deref a) = Array.to_list !m)
        ops)

(* Where ours deliberately differs. *)
let t_differences () =
  let p = Lazy.force pool in
  let a = O.A.make p 0 "x" () in
  Alcotest.(check int) "make 0" 0 (O.A.length a);
  Alcotest.check_raises "make -1" (Invalid_argument "Netsys_mem.init_array") (fun () -> ignore (O.A.make p (-1) 0 ()));
  let t = O.T.create p () in
  O.T.add t 1 "a";
  O.T.add t 2 "b";
  (* modifying from iter: the original deadlocks *)
  O.T.iter (fun k _ -> if k = 1 then O.T.replace t 1 "z") t;
  Alcotest.(check string) "modified from iter" "z" (O.T.find_c t 1);
  Alcotest.(check bool) "same Empty exception" true
    (match O.Q.pop_c (O.Q.create p ()) with _ -> false | exception Netmcore_queue.Empty -> true)

let () =
  Alcotest.run "netmcore structures"
    [
      ( "differential",
        [ differential "hashtbl" T_orig.hashtbl T_ours.hashtbl; differential "queue" T_orig.queue T_ours.queue;
          differential "array" T_orig.array T_ours.array ] );
      ("model",
        List.map
          (fun (name, t) -> Alcotest.test_case name `Quick (fun () -> QCheck.Test.check_exn t))
          [ ("hashtbl", model_hashtbl); ("queue", model_queue); ("array", model_array) ] );
      ("differences", [ Alcotest.test_case "deliberate" `Quick t_differences ]);
    ]
