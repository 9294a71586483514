(* A stand-in for the part of QCheck that tests/ocaml uses (generators,
   Test.make, Test.check_exn), for the OCaml 4.14 run of
   scripts/test-ocaml414.sh; see alcotest.ml beside it. No shrinking: a
   failure reports the first counterexample found. Deterministic: the
   random state is seeded from SHMPOOL_QCHECK_SEED (default 414). *)

module Gen = struct
  type 'a t = Random.State.t -> 'a

  let return x _ = x
  let map f g st = f (g st)
  let map2 f g1 g2 st = let a = g1 st in f a (g2 st)
  let map3 f g1 g2 g3 st = let a = g1 st in let b = g2 st in f a b (g3 st)
  let pair g1 g2 st = let a = g1 st in (a, g2 st)
  let triple g1 g2 g3 st = let a = g1 st in let b = g2 st in (a, b, g3 st)
  let ( >>= ) g f st = f (g st) st
  let ( >|= ) g f = map f g
  let bool st = Random.State.bool st
  let int_bound n st = Random.State.int st (n + 1)
  let int_range a b st = a + Random.State.int st (b - a + 1)
  let small_nat st = Random.State.int st 100
  let small_int = small_nat
  let nat st = if Random.State.int st 10 = 0 then Random.State.int st 100_000 else Random.State.int st 100
  let int st = Random.State.bits st - (1 lsl 29)
  let float st = Random.State.float st 1e6 -. 5e5
  let char st = Char.chr (Random.State.int st 256)
  let printable st = Char.chr (32 + Random.State.int st 95)
  let oneofl l st = List.nth l (Random.State.int st (List.length l))
  let oneof l st = (List.nth l (Random.State.int st (List.length l))) st

  let frequency l st =
    let total = List.fold_left (fun acc (w, _) -> acc + w) 0 l in
    let rec pick k = function
      | (w, g) :: rest -> if k < w then g st else pick (k - w) rest
      | [] -> invalid_arg "QCheck.Gen.frequency"
    in
    pick (Random.State.int st total) l

  let list_size size g st = List.init (size st) (fun _ -> g st)
  let list g = list_size small_nat g
  let array_size size g st = Array.init (size st) (fun _ -> g st)
  let string_size ?(gen = char) size st = String.init (size st) (fun _ -> gen st)
  let string ?gen st = string_size ?gen small_nat st
  let opt g st = if Random.State.int st 4 = 0 then None else Some (g st)
end

type 'a arbitrary = { gen : 'a Gen.t; print : ('a -> string) option }

let make ?print gen = { gen; print }

module Test = struct
  type t = Cell : { name : string; count : int; arb : 'a arbitrary; prop : 'a -> bool } -> t

  exception Test_fail of string * string list
  exception Failed_report of string

  let make ?(count = 100) ?(name = "anon") arb prop = Cell { name; count; arb; prop }
  let fail_reportf fmt = Printf.ksprintf (fun s -> raise (Failed_report s)) fmt

  let check_exn (Cell { name; count; arb; prop }) =
    let seed = try int_of_string (Sys.getenv "SHMPOOL_QCHECK_SEED") with _ -> 414 in
    let st = Random.State.make [| seed |] in
    for i = 1 to count do
      let x = arb.gen st in
      let show () = match arb.print with Some p -> p x | None -> "<no printer>" in
      match prop x with
      | true -> ()
      | false -> raise (Test_fail (name, [ Printf.sprintf "case %d (seed %d): %s" i seed (show ()) ]))
      | exception Failed_report r -> raise (Test_fail (name, [ Printf.sprintf "case %d (seed %d): %s: %s" i seed (show ()) r ]))
    done
end
