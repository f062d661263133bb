// The op schemas, in one place. Kernels are registered per device in cpu/*.cpp (C++) and by
// yolo_kernels/triton (Triton); fake implementations and autograd live in yolo_kernels/cpp.py.
#include <torch/library.h>

TORCH_LIBRARY(yolo_kernels, m) {
  // Target matching of one layer: pairs (in the family's pair order) of targets [nt, 6] with
  // anchors [na, 2] (grid units) on an ny x nx grid; threshold is iou_t (yolov3) or anchor_t
  // (yolov5). Returns indices [P, 4] (b, a, gj, gi; long), tbox [P, 4], anch [P, 2], tcls [P] (long).
  m.def(
      "match(Tensor targets, Tensor anchors, int ny, int nx, float threshold, str family=\"yolov3\") -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  // The IoU family of the boxes the family predicts from rows of logits ps [P, >= 4] with anchors
  // anch against tbox [P, 4]: iou [P] and d iou / d ps[:, :4] [P, 4].
  m.def("box_iou(Tensor ps, Tensor tbox, Tensor anch, str box_loss, str family=\"yolov3\") -> (Tensor, Tensor)");
  // Element-wise BCE with logits (pos_weight, focal gamma; gamma 0 = plain): loss and d loss / d x.
  m.def("bce_with_logits(Tensor x, Tensor y, float pos_weight, float gamma) -> (Tensor, Tensor)");
  // The whole loss of a family over all layers in one pass: loss [1], loss_items [4] = (lbox,
  // lobj, lcls, their sum), layer_obj [nl] (each layer's mean objectness BCE, unweighted), with
  // compute_stats the gradient statistics stats [nl + 1, 8] (row i < nl, layer i: sums of squares
  // of d loss / d p over the box, objectness and class channels, their largest magnitudes, matched
  // pairs, pairs sharing a cell with a later pair; row nl: the number of targets no layer matched,
  // then zeros; without compute_stats [0, 8]) and, when compute_grad, d loss / d p[i] for
  // every layer (laid out with p[i]'s strides when dense). balance [nl] (or None: ones) weighs each
  // layer's objectness term; gr is the IoU ratio mixed into the objectness target; threshold the
  // family's matching threshold; the yolov5 loss is the sum times the batch size. Only loss is
  // differentiable: its backward scales the gradients.
  m.def(
      "fused_loss(Tensor[] p, Tensor targets, Tensor[] anchors, Tensor? balance, str family, float gr, "
      "float giou, float cls, float cls_pw, float obj, float obj_pw, float threshold, float fl_gamma, "
      "float label_smoothing, str box_loss, str reduction, bool sort_obj_iou, bool compute_stats, "
      "bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor[])");
}
