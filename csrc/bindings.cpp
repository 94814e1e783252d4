// The extension module repa_e_fast._C (the only PYBIND11_MODULE in csrc/).
//
// Host-side speed for the data path: the record store behind
// repa_e_fast.data.record_reader.RecordReader. Import it through
// repa_e_fast/data/native_extension.py; the reader falls back to NumPy when it is missing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "record_format.h"
#include "record_store.h"
#include "shuffle.h"

namespace py = pybind11;
using repa_records::RecordStore;

PYBIND11_MODULE(_C, m) {
  m.doc() = "repa_e_fast native extension: memory-mapped record store with a gather thread pool";
  m.attr("RECORD_FORMAT_VERSION") = repa_records::kVersion;

  m.def(
      "permutation",
      [](int64_t n, uint64_t seed, uint64_t epoch) {
        if (n < 0) throw py::value_error("permutation: n must be >= 0");
        py::array_t<int64_t> out(n);
        int64_t* p = out.mutable_data();
        {
          py::gil_scoped_release release;
          repa_records::epoch_permutation(static_cast<uint64_t>(n), seed, epoch, p);
        }
        return out;
      },
      py::arg("n"), py::arg("seed"), py::arg("epoch"),
      "Epoch permutation of range(n) (definition in data/order.py / csrc/shuffle.h).");

  m.def(
      "crc32",
      [](const py::bytes& data) {
        std::string s = data;
        return repa_records::crc32_update(0, reinterpret_cast<const unsigned char*>(s.data()),
                                          s.size());
      },
      py::arg("data"), "CRC-32 of a bytes object (same value as zlib.crc32); used by tests.");

  py::class_<RecordStore>(m, "RecordStore")
      .def(py::init<const std::string&, int>(), py::arg("path"), py::arg("num_threads"))
      .def_property_readonly("path", &RecordStore::path)
      .def_property_readonly("num_threads", &RecordStore::num_threads)
      .def_property_readonly("closed", &RecordStore::closed)
      .def_property_readonly("count", [](const RecordStore& s) { return s.header().count; })
      .def_property_readonly("dtype_code", [](const RecordStore& s) { return s.header().dtype; })
      .def_property_readonly("shape",
                             [](const RecordStore& s) {
                               py::tuple t(s.header().shape.size());
                               for (size_t i = 0; i < s.header().shape.size(); ++i)
                                 t[i] = py::int_(s.header().shape[i]);
                               return t;
                             })
      .def_property_readonly("record_bytes",
                             [](const RecordStore& s) { return s.header().record_bytes; })
      .def_property_readonly("has_labels",
                             [](const RecordStore& s) { return s.header().has_labels(); })
      .def_property_readonly("payload_crc32",
                             [](const RecordStore& s) { return s.header().payload_crc; })
      .def("submit", &RecordStore::submit, py::arg("indices"), py::arg("out"),
           py::arg("labels_out") = py::none(),
           "Queue a gather of records `indices` into `out` (and labels into `labels_out`); "
           "returns a ticket. Everything is validated before anything is queued.")
      .def("wait", &RecordStore::wait, py::arg("ticket"),
           "Block (GIL released) until the job `ticket` has been written.")
      .def(
          "gather",
          [](RecordStore& s, const py::array_t<int64_t, py::array::c_style>& indices,
             const py::buffer& out, const py::object& labels_out) {
            s.wait(s.submit(indices, out, labels_out));
          },
          py::arg("indices"), py::arg("out"), py::arg("labels_out") = py::none(),
          "Synchronous submit + wait.")
      .def("pending", &RecordStore::pending)
      .def("close", &RecordStore::close);
}
